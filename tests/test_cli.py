"""The command line: listed commands, one-line errors, no patient data anywhere, recipes and overrides."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image

from rareaug import __version__
from rareaug.config import build_config, list_recipes
from rareaug.errors import RareaugError


def one_line_error(invoke, *args) -> str:
    code, out, err = invoke(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_help_lists_every_command(invoke):
    code, out, _ = invoke("--help")
    assert code == 0
    for command in ("inspect", "fit", "generate", "sweep-ratio", "export", "report", "demo"):
        assert command in out


def test_version_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "rareaug", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_report_on_a_folder_that_is_no_run_is_one_line(invoke, tmp_path):
    err = one_line_error(invoke, "report", "--run", tmp_path)
    assert "not a run directory" in err


def test_no_images_found(invoke, tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    err = one_line_error(invoke, "inspect", "--data", tmp_path / "empty")
    assert "no images" in err


def test_missing_data_folder(invoke, tmp_path):
    assert "does not exist" in one_line_error(invoke, "inspect", "--data", tmp_path / "nope")


def test_rare_class_missing_lists_classes_and_closest(invoke, folder_data):
    err = one_line_error(invoke, "inspect", "--data", folder_data, "--rare", "crak")
    assert "crack, normal, scratch" in err and "closest match: 'crack'" in err


def test_too_few_rare_images_is_an_error_and_few_is_a_warning(invoke, tmp_path):
    root = tmp_path / "data"
    for i in range(12):
        write_image(root / "normal" / f"{i}.png")
    for i in range(4):
        write_image(root / "rare" / f"{i}.png")
    assert "only 4 usable" in one_line_error(invoke, "inspect", "--data", root, "--rare", "rare")
    write_image(root / "rare" / "4.png")
    code, out, err = invoke("inspect", "--json", "--data", root, "--rare", "rare")
    assert code == 0, err
    assert any("only 5 rare images" in warning for warning in json.loads(out)["warnings"])


def test_corrupt_and_empty_files_are_listed_then_skipped_or_fatal(invoke, folder_data):
    (folder_data / "normal" / "empty.png").write_bytes(b"")
    (folder_data / "crack" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code, out, err = invoke("inspect", "--json", "--data", folder_data, "--rare", "crack")
    assert code == 0, err
    summary = json.loads(out)
    problems = {p["path"]: p["reason"] for p in summary["problems"]}
    assert set(problems) == {"normal/empty.png", "crack/broken.jpg"}
    assert "empty" in problems["normal/empty.png"]
    assert summary["classes"]["crack"] == 10 and summary["classes"]["normal"] == 20
    err = one_line_error(invoke, "inspect", "--data", folder_data, "--rare", "crack", "--on-bad-file", "fail")
    assert "broken.jpg" in err or "empty.png" in err


def test_undecodable_dicom_names_the_package(invoke, folder_data):
    import shutil

    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("JPEG-LL.dcm"), folder_data / "crack" / "compressed.dcm")
    err = one_line_error(invoke, "inspect", "--data", folder_data, "--rare", "crack", "--on-bad-file", "fail")
    assert "compressed.dcm" in err and "JPEG Lossless" in err and "pylibjpeg" in err


def test_no_patient_identifier_leaves_the_input(invoke, dicom_data, tmp_path):
    run = tmp_path / "run"
    code, table, err = invoke("inspect", "--data", dicom_data, "--rare", "pneumothorax", "--run", run)
    assert code == 0, err
    code, as_json, _ = invoke("inspect", "--json", "--data", dicom_data, "--rare", "pneumothorax", "--run", run)
    outputs = [table, as_json, err] + [p.read_text() for p in run.rglob("*") if p.is_file()]
    for text in outputs:
        assert "PID-SECRET" not in text and "Doe^Jane" not in text and "Jane" not in text


def test_recipes_ship_and_cli_flags_override_them():
    assert set(list_recipes()) >= {"chest_xray", "magnetic_tile", "mvtec", "natural"}
    chest = build_config("chest_xray")
    assert chest.recipe.augment.hflip is False and "{class}" in chest.recipe.prompt
    assert "chest x-ray" in chest.recipe.prompt
    overridden = build_config("chest_xray", {"data.negatives": "all-other", "seed": 3})
    assert overridden.data.negatives == "all-other" and overridden.seed == 3


def test_recipe_from_path_and_bad_recipes(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("recipe:\n  prompt: 'an x-ray of {class}'\n  resolution: 256\n")
    assert build_config(str(good)).recipe.resolution == 256
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("recipe:\n  resolutoin: 256\n")
    with pytest.raises(RareaugError, match="unknown key recipe.resolutoin"):
        build_config(str(bad_key))
    bad_value = tmp_path / "bad2.yaml"
    bad_value.write_text("recipe:\n  resolution: 100\n")
    with pytest.raises(RareaugError, match="multiple of 8"):
        build_config(str(bad_value))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("recipe: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RareaugError, match="not valid YAML"):
        build_config(str(unsafe))
    with pytest.raises(RareaugError, match="no such recipe"):
        build_config("no_such_recipe")


def test_default_recipe_follows_the_layout(mt_data, nih_data, folder_data):
    assert build_config(None, {"data.data": str(mt_data)}).recipe.name == "magnetic_tile"
    assert build_config(None, {"data.data": str(nih_data)}).recipe.name == "chest_xray"
    assert build_config(None, {"data.data": str(folder_data)}).recipe.name == "natural"


def test_demo_runs_on_the_shipped_sample(invoke, tmp_path, monkeypatch):
    """Every stage of the demo, wired as `make demo` runs it; short LoRA and classifier training keep the
    suite fast (the demo's own sizes are timed by running `make demo`, not here)."""
    import rareaug.cli

    monkeypatch.setattr(rareaug.cli, "DEMO_SIZES", {"fit__steps": 10, "sweep__steps": 5, "generate__steps": 4})
    code, out, err = invoke("demo", "--run", tmp_path / "demo")
    assert code == 0, err
    assert "pullover" in out and (tmp_path / "demo" / "split.csv").exists()
    assert Path(tmp_path / "demo" / "data.json").exists()
    from rareaug.split import read_split

    train = [r for r in read_split(tmp_path / "demo" / "split.csv") if r.rare and r.split == "train"]
    assert len(list((tmp_path / "demo" / "loras" / "loft").glob("*.safetensors"))) == len(train) > 10
    pool = next((tmp_path / "demo" / "synthetic").iterdir())
    assert len(list(pool.glob("*.png"))) >= 2 * len(train) and (pool / "manifest.csv").exists()
    assert (tmp_path / "demo" / "sweep" / "summary.md").exists() and "Recommendation" in out
    assert (tmp_path / "demo" / "report.html").exists() and "report.html" in "".join(out.split())  # rich wraps


def test_every_package_is_listed_for_installation():
    """pyproject lists packages by hand (recipes/ is mapped); a missing one installs broken from a wheel."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for top in ("rareaug", "data_adapters")
             for p in (root / top).rglob("__init__.py")}
    found.add("rareaug.recipes")
    assert found == listed
    folders = {".".join(p.relative_to(root).parts) for top in ("rareaug", "data_adapters")
               for p in (root / top).rglob("*") if p.is_dir() and any(p.glob("*.py")) and "__pycache__" not in p.parts}
    assert folders <= found, "a folder of modules without __init__.py"
    assert re.search(r"rareaug\.recipes", (root / "pyproject.toml").read_text())


def test_inspect_warns_when_val_has_no_rare_image_and_when_negatives_are_missing(invoke, tmp_path):
    root = tmp_path / "data"
    for i in range(8):
        write_image(root / "crack" / f"{i}.png")
    code, out, err = invoke("inspect", "--json", "--data", root, "--rare", "crack")
    assert code == 0, err
    assert any("no negative images" in w for w in json.loads(out)["warnings"])
    for i in range(12):
        write_image(root / "normal" / f"{i}.png")
    code, out, err = invoke("inspect", "--json", "--data", root, "--rare", "crack", "--max-rare", "1")
    warnings = json.loads(out)["warnings"]
    assert any("no rare image in val" in w for w in warnings)


def test_data_json_keeps_no_file_name_from_problem_reasons(invoke, tmp_path):
    root = tmp_path / "data"
    for i in range(8):
        write_image(root / "crack" / f"{i}.png")
        write_image(root / "normal" / f"{i}.png")
    (root / "crack" / "MRN_998877_Doe.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    code, out, err = invoke("inspect", "--data", root, "--rare", "crack", "--run", run)
    assert code == 0, err
    text = (run / "data.json").read_text()
    assert "MRN" not in text and "Doe" not in text and str(root) not in text
    assert '"kind": "unreadable image"' in text


@pytest.mark.parametrize("case", ["run_is_a_file", "latin1_csv", "not_mvtec", "generate_without_run"])
def test_odd_inputs_end_in_one_line(invoke, tmp_path, folder_data, case):
    if case == "run_is_a_file":
        (tmp_path / "run").write_text("x")
        err = one_line_error(invoke, "inspect", "--data", folder_data, "--rare", "crack", "--run", tmp_path / "run")
        assert "is a file" in err
    elif case == "latin1_csv":
        table = tmp_path / "labels.csv"
        table.write_bytes("path,label\ncafé.png,x\n".encode("latin-1"))
        assert "UTF-8" in one_line_error(invoke, "inspect", "--data", table)
    elif case == "not_mvtec":
        assert "MVTec" in one_line_error(invoke, "inspect", "--data", folder_data, "--layout", "mvtec")
    else:
        err = one_line_error(invoke, "generate", "--run", tmp_path / "nowhere", "--n", "2")
        assert "split.csv does not exist" in err and "rareaug fit" in err


def test_every_third_party_import_is_a_declared_dependency():
    """A module imported by the package but missing from pyproject installs broken on a clean machine."""
    import ast
    import sys

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re_name(d) for d in project["dependencies"]}
    # Optional extras count for the modules that say how to install them when missing (ray: `rareaug[ray]`).
    declared |= {re_name(d) for d in project["optional-dependencies"]["ray"]}
    # import name -> distribution name, where they differ
    aliases = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "open_clip": "open_clip_torch",
               "skimage": "scikit-image"}
    imported = set()
    for path in list((root / "rareaug").rglob("*.py")) + list((root / "data_adapters").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    # skimage: only `python -m rareaug.samples`, the maintainers' tool that rebuilds the shipped sample (dev extra).
    third_party = {name for name in imported if name not in sys.stdlib_module_names
                   and name not in ("rareaug", "data_adapters", "__future__", "skimage")}
    missing = {name for name in third_party if re_name(aliases.get(name, name)) not in declared}
    assert not missing, f"imported but not in pyproject dependencies: {sorted(missing)}"


def re_name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_demo_on_own_data_needs_a_model_and_a_rare_class(invoke, folder_data, tmp_path):
    err = one_line_error(invoke, "demo", "--data", folder_data, "--rare", "crack", "--out", tmp_path / "d")
    assert "--base-model" in err
    err = one_line_error(invoke, "demo", "--rare", "crack", "--out", tmp_path / "d")
    assert "go together" in err
