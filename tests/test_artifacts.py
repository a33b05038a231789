"""Artifacts describe themselves: checkpoint metadata in the safetensors header, export
metadata inside ONNX and TorchScript files, and a model card in every run folder."""

import json

import pytest
import torch

from igkd.models import build_model, load_model, read_metadata, save_checkpoint

SPEC = "mobilenetv2:width=0.25,drop=14"
META = {"model": SPEC, "num_classes": 4, "in_channels": 3, "classes": ["cat", "dog", "emu", "fox"],
        "image_size": [12, 12], "preprocessing": {"normalize": "dataset", "mean": [0.5, 0.4, 0.3],
                                                  "std": [0.2, 0.2, 0.25]}}


def test_checkpoint_metadata_survives_without_its_json(tmp_path):
    torch.manual_seed(0)
    net = build_model(SPEC, 4, 3).eval()
    weights = save_checkpoint(tmp_path / "model", net, META)
    beside = json.loads((tmp_path / "model.json").read_text())
    x = torch.rand(2, 3, 12, 12)
    with_json = load_model(weights)[0](x)
    (tmp_path / "model.json").unlink()
    alone = read_metadata(weights)
    assert alone == {k: v for k, v in beside.items() if k != "sha256"}
    model, meta = load_model(weights)  # architecture, classes and preprocessing from the file alone
    assert meta["classes"] == META["classes"] and meta["preprocessing"]["mean"] == [0.5, 0.4, 0.3]
    torch.testing.assert_close(model(x), with_json, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_metadata_is_inside_the_file(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from igkd.export import embed_metadata, onnx_bytes, read_export_metadata, torchscript_module
    net = build_model(SPEC, 4, 3).eval()
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    if fmt == "onnx":
        path.write_bytes(onnx_bytes(net, (3, 12, 12)))
    else:
        torch.jit.save(torchscript_module(net, (3, 12, 12)), str(path))
    assert read_export_metadata(path) is None  # nothing embedded yet
    meta = {"format": "igkd-export/1", "model": SPEC, "classes": META["classes"],
            "preprocessing": {"normalize": "none"}, "input": {"shape": ["batch", 3, 12, 12]}}
    embed_metadata(path, meta)
    assert read_export_metadata(path) == meta
    if fmt == "onnx":  # plain entries for tools that list metadata_props (Netron, onnxruntime)
        from igkd.export import ort_session
        props = ort_session(path).get_modelmeta().custom_metadata_map
        assert json.loads(props["classes"]) == META["classes"] and props["model"] == SPEC
    from igkd.export import load_runner
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_runner(path)(x), net(x), rtol=1e-4, atol=1e-4)  # still runs
