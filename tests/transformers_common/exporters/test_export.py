# Copyright 2026 the hf-arch authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# NOT vendored: transformers' PyPI sdist does not ship tests/exporters/test_export.py. This is hf-arch's own
# ExportTesterMixin (the base class test_modeling_common.ModelTesterMixin imports): every model class exports with
# transformers 5.25's own `torch.export` exporter (transformers.exporters.DynamoExporter) and the exported program
# reproduces the eager outputs. `test_torch_exportable = False` on a test class opts out, as in transformers.
"""ExportTesterMixin: torch.export through transformers.exporters.DynamoExporter."""

import pytest

from transformers import is_torch_available
from transformers.testing_utils import torch_device


if is_torch_available():
    import torch


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for key in ("logits", "last_hidden_state"):
            if key in output and isinstance(output[key], torch.Tensor):
                return output[key]
        values = list(output.values())
    else:
        values = list(output)
    for value in values:
        found = _first_tensor(value) if not isinstance(value, torch.Tensor) else value
        if found is not None:
            return found
    return None


class ExportTesterMixin:
    test_torch_exportable = True

    @pytest.mark.torch_export_test
    def test_torch_export(self, atol=1e-4, rtol=1e-4):
        if not self.test_torch_exportable:
            self.skipTest(reason="test_torch_exportable=False for this model.")
        from transformers.exporters import DynamoConfig, DynamoExporter

        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(config).to(torch_device).eval()
                inputs = {k: v for k, v in self._prepare_for_class(inputs_dict, model_class).items() if v is not None}
                inputs["use_cache"] = False
                with torch.no_grad():
                    eager = _first_tensor(model(**inputs))
                program, _ = DynamoExporter().export_program(model, dict(inputs), DynamoConfig())
                tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                with torch.no_grad():
                    exported = _first_tensor(program.module()(**tensors))
                self.assertIsNotNone(exported, "the exported program returned no tensor")
                torch.testing.assert_close(exported, eager, atol=atol, rtol=rtol)
