"""Unusual paths and environments: folders named like ``~x`` or ``-run``, paths holding commas
and quotes in the deployment commands' lists, and no home folder for the cache."""

import json
import pwd

import pytest
import torch

from conftest import TINY_TEACHER
from helpers_cli import run_igkd
from helpers_data import write_image_folder
from igkd.models import Normalized, build_model, save_checkpoint

NET = ("import torch.nn as nn\n"
       "def make(num_classes, in_channels, width=4):\n"
       "    return nn.Sequential(nn.Conv2d(in_channels, int(width), 3, padding=1), nn.ReLU(),\n"
       "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(int(width), num_classes))\n")


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_a_data_folder_named_tilde_something_is_read_not_a_traceback(tmp_path, monkeypatch):
    """imagefolder:~x (a folder named '~x', no user x): Path.expanduser raised RuntimeError."""
    from igkd.data import load_dataset
    write_image_folder(tmp_path / "~x", per_class=2, side=8)
    monkeypatch.chdir(tmp_path)
    assert load_dataset("imagefolder:~x,size=8,cache=0").train.labels.tolist() == [0, 0, 1, 1]
    r = run_igkd("evaluate", "--weights", "w.safetensors", "--data", "imagefolder:~nosuchuser/data")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def _no_home(monkeypatch):
    """A container run as a uid without a passwd entry and without HOME."""
    monkeypatch.delenv("HOME", raising=False)

    def missing(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.setattr(pwd, "getpwuid", missing)


def test_no_home_folder_needs_no_home_with_igkd_cache_dir_and_one_line_without(tmp_path, monkeypatch):
    from igkd.runtime import cache_dir
    _no_home(monkeypatch)
    monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir("stores") == tmp_path / "cache" / "stores"  # was RuntimeError: Path.home() looked up anyway
    monkeypatch.delenv("IGKD_CACHE_DIR")
    r = run_igkd("precompute", "--data", "demo", "--teacher", tmp_path / "t.safetensors")
    _one_line_error(r, "IGKD_CACHE_DIR", "HOME")


def test_a_tilde_in_igkd_cache_dir_is_the_home_not_a_folder_named_tilde(tmp_path, monkeypatch):
    from igkd.runtime import cache_dir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IGKD_CACHE_DIR", "~/igkd-cache")  # as a Dockerfile's ENV leaves it
    assert cache_dir("stores") == tmp_path / "home" / "igkd-cache" / "stores"


@pytest.mark.parametrize("flag", ["--out", "--data"])
def test_a_value_starting_with_a_dash_is_refused_saying_how_to_write_it(flag):
    args = {"--out": "run", "--data": "demo", flag: "-run"}
    r = run_igkd("train", *[x for kv in args.items() for x in kv])
    _one_line_error(r, f"{flag}=-VALUE", "./-NAME")


def test_bench_and_audit_take_paths_and_quoted_specs_holding_commas(tmp_path):
    """bench latency --model py:'DIR, 2/net.py:make' was cut at the comma into two specs, and
    --weights / --student paths holding a comma had no way of being written."""
    from igkd.deploy.common import split_files, split_specs
    folder = tmp_path / "nets, v2=é"
    folder.mkdir()
    (folder / "net.py").write_text(NET)
    spec = f"py:'{folder}/net.py:make',width=3"
    assert split_specs(f"{spec},mobilenetv2:width=0.5,drop=3") == [spec, "mobilenetv2:width=0.5,drop=3"]
    torch.manual_seed(0)
    ckpt = save_checkpoint(folder / "teacher", Normalized(build_model(TINY_TEACHER, 2, 3), [0.5] * 3, [0.5] * 3),
                           {"model": TINY_TEACHER, "num_classes": 2, "in_channels": 3, "classes": ["a", "b"],
                            "image_size": [8, 8], "preprocessing": {"normalize": "none"}})
    other = tmp_path / "other.safetensors"
    other.write_bytes(ckpt.read_bytes())
    assert split_files([str(ckpt)], "--weights") == [str(ckpt)]
    assert split_files(f"'{ckpt}',{other}", "--weights") == [str(ckpt), str(other)]
    r = run_igkd("bench", "latency", "--model", spec, "--input", "3x8x8", "--classes", "2", "--warmup", "0",
                 "--min-time", "0", "--min-reps", "1", "--max-reps", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert [row["model"] for row in json.loads(r.stdout)["rows"]] == [spec]
    r = run_igkd("bench", "latency", "--weights", ckpt, "--warmup", "0", "--min-time", "0", "--min-reps", "1",
                 "--max-reps", "1")
    assert r.returncode == 0, r.stderr
    r = run_igkd("bench", "latency", "--weights", f"{ckpt},{other}", "--min-time", "0")
    _one_line_error(r, "in quotes", str(tmp_path / "nets"))


def test_text_naming_a_non_ascii_path_is_written_under_a_python_without_utf8_mode(tmp_path):
    """PYTHONUTF8=0 under LC_ALL=C reads 'stüdent' from argv as 'st\\udcc3\\udcbcdent': the model
    card naming it failed to encode after training (UnicodeEncodeError, a traceback)."""
    from igkd.fileio import write_text
    write_text(tmp_path / "README.md", "run st\udcc3\udcbcdent")
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "run stüdent"


def test_a_semicolon_inside_quotes_belongs_to_its_spec_in_lists_of_students(tmp_path):
    """--students and audit's --student-model separate specs with ';': a module in a folder
    named 'a;b' was cut in two. Quoted, its path is one spec; a YAML list entry holding an
    unquoted ';' is refused rather than read as two students."""
    from igkd.deploy.audit import _student_specs
    from igkd.errors import UserError
    from igkd.experiments.compression import student_specs
    from igkd.experiments.config import _flatten_lists, resolve
    from igkd.spec import canonical_spec, split_specs
    folder = tmp_path / "a;b"
    folder.mkdir()
    (folder / "net.py").write_text(NET)
    quoted = f'py:"{folder}/net.py":make,width=3'
    cfg = resolve("compression", overrides=dict(depths="", widths="", students=f"{quoted}; resnet:depth=8"))
    specs = [spec for _, _, spec in student_specs(cfg)]
    assert specs == [quoted, "resnet:depth=8"]
    assert build_model(specs[0], 10, 3)[0].out_channels == 3
    assert _student_specs(f"{quoted};", 2) == [quoted, ""]
    # a spec written back (a run's record, a canonical key) is quoted, so it splits as one again
    assert split_specs(canonical_spec(quoted) + ";resnet", "x") == [f"py:'{folder}/net.py:make',width=3", "resnet"]
    assert _flatten_lists({"students": [quoted, "resnet:depth=8"]})["students"] == f"{quoted};resnet:depth=8"
    with pytest.raises(UserError, match=r"^students entry 'py:.*a;b/net.py:make' holds a ';'; quote the part"):
        _flatten_lists({"students": [f"py:{folder}/net.py:make"]})
    with pytest.raises(UserError, match=r"^unclosed \" quote in --student-model"):
        _student_specs(f'py:"{folder}/net.py:make', 1)
