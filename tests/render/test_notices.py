"""Import notices of torchao and its neighbours (`sidecar.render.notices`): dropped by their text only."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sidecar.render.notices import IMPORT_NOTICES, quiet_import_notices

NOTICES = (
    "Failed to load",
    "_C_mxfp8",
    "is an Enum subclass",
    "Unable to import `torchao` Tensor objects",
)


def test_the_notices_are_dropped_and_every_other_record_kept(caplog):
    quiet_import_notices()
    quiet_import_notices()  # a second call adds no second filter
    for name in IMPORT_NOTICES:
        ours = [f for f in logging.getLogger(name).filters if type(f).__module__ == "sidecar.render.notices"]
        assert len(ours) == 1, name
    torchao = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING):
        torchao.warning("Failed to load %s: Could not load this library", "/x/torchao/_C_mxfp8.so")
        logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
            "Unable to import `torchao` Tensor objects. This may affect loading checkpoints"
        )
        torchao.warning("Skipping import of cpp extensions due to incompatible torch version")
        torchao.error("something real went wrong")
    assert [record.getMessage() for record in caplog.records] == [
        "Skipping import of cpp extensions due to incompatible torch version",
        "something real went wrong",
    ]


@pytest.mark.slow
def test_importing_diffusers_and_peft_prints_none_of_them():
    """A fresh interpreter, as the CLI starts: transformers imports torchao on the way."""
    code = (
        "from sidecar.render.notices import quiet_import_notices; quiet_import_notices(); "
        "import diffusers, peft; from diffusers import StableDiffusionXLPipeline"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not [notice for notice in NOTICES if notice in result.stderr], result.stderr
