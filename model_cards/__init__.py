"""Model card templates and the card writer."""
