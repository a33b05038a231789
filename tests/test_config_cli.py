"""Configs and the command line a user relies on (issue 17): YAML spellings, validation on
construction, choices in --help, quoted spec paths, the lazy package, python -m igkd."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import igkd
from igkd.config import DistillConfig, TrainConfig, build, load_yaml
from igkd.errors import UserError
from igkd.spec import parse_spec


def test_yaml_numbers_in_any_spelling(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("distill:\n  lr: 1e-3\n  epochs: '3'\n  weight_decay: 5.0e-4\n")
    values = load_yaml(cfg, "distill")
    assert values["lr"] == "1e-3"  # PyYAML reads a mantissa without a dot as a string...
    c = build(DistillConfig, values)
    assert c.lr == 1e-3 and isinstance(c.lr, float) and c.epochs == 3 and isinstance(c.epochs, int)  # ...igkd not
    with pytest.raises(UserError, match="--lr must be a number, got 'fast'"):
        build(DistillConfig, {"lr": "fast"})
    with pytest.raises(UserError, match="--epochs must be an integer"):
        build(DistillConfig, {"epochs": "2.5"})
    # YAML's .inf and .nan for an integer option: one line, not OverflowError / ValueError
    cfg.write_text("distill:\n  epochs: .inf\n  batch_size: .nan\n")
    with pytest.raises(UserError, match="--epochs inf is out of range; use a finite number"):
        build(DistillConfig, load_yaml(cfg, "distill"))
    with pytest.raises(UserError, match="--batch-size nan is out of range"):
        build(DistillConfig, {"batch_size": float("nan")})
    # options beside sections were dropped without a word (a typo too); now they are refused
    cfg.write_text("lr: 0.123\nbogus_option: 7\ndistill:\n  epochs: 2\n")
    for section in ("distill", "train", None):
        with pytest.raises(UserError, match=r"has sections \(distill:\) and also options at its top level "
                                            r"\(lr, bogus_option\); indent each option under the section"):
            load_yaml(cfg, section)
    cfg.write_text("lr: 0.123\nepochs: 2\n")  # a file of options alone is every command's
    assert load_yaml(cfg, "distill") == {"lr": 0.123, "epochs": 2}


def test_configs_validate_when_built_directly():
    with pytest.raises(UserError, match=r"--T -1.0 is out of range"):
        DistillConfig(T=-1)
    with pytest.raises(UserError, match="--optimizer 'adamw' is not one of sgd, adam"):
        TrainConfig(optimizer="adamw")
    assert DistillConfig(T=4).T == 4.0


def test_help_shows_choices_and_a_bad_choice_is_one_line(capsys):
    from igkd.cli import main
    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--normalize {dataset,none,imagenet}" in out and "--optimizer {sgd,adam}" in out
    with pytest.raises(SystemExit) as e:
        main(["distill", "--optimizer", "adamw", "--out", "x"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("igkd: error: argument --optimizer")


def test_spec_paths_with_commas_are_quoted(tmp_path):
    root = tmp_path / "cats, dogs"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / "0.png")
    for spec in (f'imagefolder:"{root}",cache=0', f"imagefolder:'{root}',cache=0"):
        ds = igkd.load_dataset(spec)
        assert ds.classes == ["cat", "dog"] and len(ds.train) == 2
        assert parse_spec(ds.spec) == parse_spec(spec)  # the spec it records reads back the same
    assert parse_spec("py:pkg.mod:make,width=2") == parse_spec("py:pkg.mod:make,width=2")
    with pytest.raises(UserError, match="unclosed"):
        parse_spec('imagefolder:"/a,b')


def test_api_names_stay_functions_whatever_is_imported():
    """The package imports its API lazily; submodules named like functions must not shadow them."""
    import igkd.distill.trainer  # noqa: F401
    import igkd.evaluate.metrics  # noqa: F401
    import igkd.precompute  # noqa: F401
    assert callable(igkd.distill) and callable(igkd.precompute) and callable(igkd.evaluate)
    assert igkd.distill.__module__ == "igkd.api" and igkd.precompute.__module__ == "igkd.api"
    from igkd import distill, run_experiment
    assert distill is igkd.distill and callable(run_experiment)
    assert set(igkd.__all__) <= set(dir(igkd))


def test_python_dash_m_and_version_without_torch():
    r = subprocess.run([sys.executable, "-m", "igkd", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"igkd {igkd.__version__}" and igkd.__version__ != "0+unknown"
    code = "import sys, igkd.cli; igkd.cli.make_parser(); print('torch' in sys.modules, 'scipy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr  # --help builds the parser without them


def test_shipped_recipes_by_name(capsys):
    from igkd.cli import main
    from igkd.config import find_config, shipped_configs
    assert {"demo", "cifar10_paper", "cifar10_strong", "demo_experiments"} <= set(shipped_configs())
    values = load_yaml("cifar10_paper", "distill")
    assert values["optimizer"] == "adam" and float(values["lr"]) == 1e-3  # the paper's recipe (METHOD.md 6)
    assert find_config("demo").read_text() == shipped_configs()["demo"].read_text()
    with pytest.raises(SystemExit):
        main(["config", "show", "cifar10_paper"])
    assert capsys.readouterr().out == shipped_configs()["cifar10_paper"].read_text()
    with pytest.raises(UserError, match="does not exist and is not a shipped recipe either .shipped: .*cifar10_paper"):
        load_yaml("cifar10_papr", "distill")


def test_wheel_holds_license_types_configs_and_no_torch_cap(tmp_path):
    """Built as a user's pip would (no isolation here: no network needed for setuptools)."""
    import email
    import re
    import zipfile
    from importlib.metadata import version
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    # Without isolation the build uses this environment's setuptools. torch 2.13 pins
    # setuptools>=77.0.3, so the README's environment (and CI) always has a new enough one; with
    # another torch an older one may be here (65.5 beside torch 2.11), which cannot read the
    # SPDX license field: a fact about this environment, not about the wheel a user's pip builds
    # (pip isolates the build and fetches what pyproject.toml asks for).
    need = re.search(r'"setuptools>=([\d.]+)"', (repo / "pyproject.toml").read_text()).group(1)
    have = version("setuptools")
    if tuple(map(int, re.findall(r"\d+", have)[:2])) < tuple(map(int, need.split(".")[:2])):
        pytest.skip(f"this environment's setuptools {have} is older than the {need} pyproject.toml builds with "
                    "(pip install -U setuptools to run it)")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(repo)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("igkd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
    assert "igkd/py.typed" in names and "igkd/__main__.py" in names
    assert {f"igkd/configs/{n}.yaml" for n in ("demo", "cifar10_paper", "cifar10_strong", "demo_experiments")} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    torch_req = next(r for r in requires if r.startswith("torch"))
    assert torch_req.replace(" ", "") == "torch>=2.5" and "<" not in torch_req
    assert not any(r.startswith("captum") and "extra" not in r for r in requires)  # captum: test extra only


def test_a_module_in_a_config_field_names_the_api_keyword():
    """DistillConfig(teacher=<nn.Module>) raised a raw TypeError; modules go to igkd.distill."""
    from torch import nn
    with pytest.raises(UserError, match=r"igkd.distill\(cfg, out, teacher=module\)"):
        DistillConfig(teacher=nn.Linear(2, 2))
    with pytest.raises(UserError, match=r"student=module"):
        DistillConfig(model=nn.Linear(2, 2))


def test_every_shipped_recipe_section_builds():
    """A typo in a shipped recipe fails here, not after a user's hours of training."""
    from igkd.config import DistillConfig, PrecomputeConfig, TrainConfig, build, read_yaml_file, shipped_configs
    sections = {"train": TrainConfig, "precompute": PrecomputeConfig, "distill": DistillConfig}
    built = 0
    for name, path in shipped_configs().items():
        doc = read_yaml_file(path)
        for section, cls in sections.items():
            if section in doc:
                build(cls, doc[section], {}, f"{name}:{section}")
                built += 1
    assert built >= 8
    doc = read_yaml_file(shipped_configs()["imagefolder224"])
    assert build(DistillConfig, doc["distill"], {}, "imagefolder224").augment == "random-resized-crop"
