"""Print the README command shown under a bold label (e.g. "Main job", "Test suite"), so CI runs it verbatim."""

import re
import sys
from pathlib import Path

label = sys.argv[1]
readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
match = re.search(rf"\*\*{re.escape(label)}\*\*.*?```bash\n(.*?)\n```", readme, re.DOTALL)
if match is None:
    sys.exit(f"README.md has no ```bash block under **{label}**")
print(match.group(1).strip())
