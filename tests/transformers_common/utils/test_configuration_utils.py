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
# NOT vendored: transformers' PyPI sdist does not ship tests/utils/test_configuration_utils.py. This is hf-arch's own
# `config_common_kwargs` for ConfigTester.check_config_arguments_init (test_configuration_common.py, vendored): a
# non-default value for every attribute transformers 5.25's PreTrainedConfig itself declares, which every config
# must store as given.
"""Non-default values of PreTrainedConfig's own attributes (transformers 5.25)."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["HfArchTestModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
