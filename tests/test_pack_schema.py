"""The packed format's shared schema: writer and validator agree, reading needs no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from recu_cli import pack
from recu_cli.bnn import convert_model
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.fields import FieldError
from recu_cli.models import create_model
from recu_cli.pack import schema
from recu_cli.spec import ModelSpec
from recu_cli.stats import model_stats
from tests.conftest import REPO

OLD = REPO / "tests" / "data" / "packed-v1-resnet20.safetensors"


def test_reading_header_metadata_and_stats_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import recu_cli.pack, recu_cli.pack.schema, recu_cli.pack.header\n"
        "import recu_cli.pack.validate, recu_cli.pack.reader\n"
        "from recu_cli.pack import read\n"
        f"p = read({str(OLD)!r}, verify=False, checksum=True, known=None)\n"
        "assert p.spec.name == 'resnet20' and len(p.stats) == len(p.layers) == 18\n"
        "assert p.tensors and p.recipe.tau > 0\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lazy_names_resolve_to_their_modules() -> None:
    from recu_cli.pack import bits, rebuild, write

    assert pack.save is write.save and pack.load is rebuild.load
    assert pack.pack_signs is bits.pack_signs and pack.rebuild is rebuild
    with pytest.raises(AttributeError):
        pack.no_such_name  # noqa: B018


def test_spec_and_recipe_check_their_own_fields() -> None:
    good = create_model("resnet20")[1].to_dict()
    assert ModelSpec.from_dict(good) == ModelSpec.from_dict(json.loads(json.dumps(good)))
    with pytest.raises(FieldError, match="missing source, crop_pct") as e:
        ModelSpec.from_dict({k: v for k, v in good.items() if k not in ("source", "crop_pct")})
    assert e.value.what == "missing source, crop_pct"
    with pytest.raises(FieldError, match="num_classes is not a positive integer"):
        ModelSpec.from_dict({**good, "num_classes": True})
    with pytest.raises(FieldError) as e:
        ConvertConfig.from_dict({"tau": 0.9, "zzz": 1})
    assert str(e.value) == "unknown conversion option(s) ['zzz'] in the recipe"
    assert e.value.unknown == ["zzz"]
    with pytest.raises(FieldError, match="'b_star' has the wrong type"):
        ConvertConfig.from_dict({"b_star": "2"})
    with pytest.raises(FieldError, match="'tau' is not finite"):
        ConvertConfig.from_dict({"tau": float("nan")})
    with pytest.raises(RecuError, match="--act must be one of"):
        ConvertConfig.from_dict({"activation": "relu"})
    assert ConvertConfig.from_dict({}) == ConvertConfig()


def test_writer_output_matches_the_schema(tmp_path) -> None:
    config = ConvertConfig(tau=0.9, act_threshold="learned")
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    path = tmp_path / "m.safetensors"
    pack.save(path, model, spec, config, keep_latent=True, stats=model_stats(model))
    with safe_open(str(path), "numpy") as f:
        meta, names = f.metadata(), set(f.keys())
    layers, stats = json.loads(meta[schema.LAYERS]), json.loads(meta[schema.STATS])
    entry_keys = [f.name for f in dataclasses.fields(schema.LayerEntry)]
    stat_keys = ["name"] + [f.name for f in dataclasses.fields(schema.LayerStats)]
    assert all(list(e) == entry_keys for e in layers)
    assert all(list(x) == stat_keys for x in stats)
    for e in layers:
        roles = schema.layer_roles(bias=False, threshold=True, latent=True)
        assert {schema.tensor_name(e["name"], r) for r in roles} <= names
    packed = pack.read(path)
    assert packed.metadata()[schema.CHECKSUM] == meta[schema.CHECKSUM]
    assert set(meta) == set(packed.metadata())
