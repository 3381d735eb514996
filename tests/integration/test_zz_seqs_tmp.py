# TEMPORARY (helper SEQS, deleted after one run): the stack tests of test_seq_encoder_triton on a build already made.
from pathlib import Path

import pytest

from tests.integration.test_seq_encoder_triton import (own_stack, test_built_seq_encoder_on_triton_equals_in_process,  # noqa: F401
                                                       test_retrieve_uses_the_vector_and_skips_the_channel_without_triton)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def built():
    return Path("/tmp/SEQS/small/artifacts"), Path("/tmp/SEQS/small/model_repository")
