"""What a user meets before any math: the CLI's help and version, the shipped data and where it is found
(also from a bare clone), the optional plot dependency, the model card a saved model carries."""
import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys

import pytest

import uae_fast
from uae_fast.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REST = re.compile(r"``|:(class|func|meth|mod|attr|data|obj|exc|ref):`|::$", re.M)


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_cli_option_has_help_and_no_rest_markup():
    parser = build_parser()
    subs = _subparsers(parser)
    assert {"score", "train", "eval", "quickstart"} <= set(subs)
    missing = []
    for name, p in [("uae", parser)] + sorted(subs.items()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{'uae' if name == 'uae' else 'uae ' + name} {'/'.join(a.option_strings) or a.dest}")
        text = p.format_help()
        assert not REST.search(text), f"reST markup in `{name} --help`: {REST.search(text).group(0)!r}"
    assert not missing, "options without help text: " + ", ".join(missing)


def test_help_shows_defaults():
    text = " ".join(_subparsers(build_parser())["train"].format_help().split())
    assert "(default: 2.0)" in text  # --epochs: default appended by the shared formatter
    assert "(default: 5e-05)" in text  # --lr
    assert "--resume" in text and "(default: False)" not in text  # flags show none


def test_plain_strips_rest():
    from uae_fast.cli import plain

    assert plain("``uae score``: see :class:`~uae_fast.BiEncoder` and :func:`utility_infonce`. Example::") == \
        "uae score: see uae_fast.BiEncoder and utility_infonce. Example:"
    assert plain("a::b") == "a::b"


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"uae {uae_fast.__version__}"
    # pyproject reads the same attribute (no second copy of the number)
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "uae_fast.__version__" }' in text
    assert not re.search(r'^version\s*=\s*"', text, re.M)
    assert f"## {uae_fast.__version__}" in open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8").read()


def test_package_files():
    assert os.path.exists(os.path.join(ROOT, "uae_fast", "py.typed"))
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "CC BY 4.0" in open(os.path.join(ROOT, "data", "README.md"), encoding="utf-8").read()


# ---------------------------------------------------------------------------------------- data
def test_quickstart_data_defaults_to_the_shipped_slices(monkeypatch):
    from uae_fast.data import QUICKSTART_SLICE, load_dataset, quickstart_qasper_path
    from uae_fast.quickstart import check

    monkeypatch.delenv("UAE_DATA_DIR", raising=False)
    for split in ("train", "dev"):
        assert quickstart_qasper_path(split) == os.path.join(ROOT, "data", QUICKSTART_SLICE.format(split=split))
    info = check()
    # the quickstart evaluates the first 200 dev questions with gold and scores 12 train questions
    assert info["dev_questions_with_gold"] >= 200 and info["train_questions"] >= 12
    assert info["utilities"] == os.path.join(ROOT, "data", "qasper-train-utilities.jsonl.gz")
    # the questions the quickstart scores (the scorer's first 12) are in the train slice with shipped rows
    from uae_fast.scoring import select_queries
    from uae_fast.training import load_utilities

    scored = [q.id for q in select_queries(load_dataset(info["train_data"]))[:12]]
    table, _ = load_utilities(info["utilities"])
    assert all(q in table for q in scored)
    assert info["train_questions_with_utilities"] == 660  # two epochs of the quick run's 80 x 16 questions


def test_quickstart_cuts_the_shipped_table_to_the_slice(tmp_path):
    from uae_fast.data import QUICKSTART_SLICE, load_dataset
    from uae_fast.quickstart import _shipped_for
    from uae_fast.training import DEFAULT_UTILITIES, check_utilities, load_utilities

    shipped = os.path.join(ROOT, "data", DEFAULT_UTILITIES)
    ds = load_dataset(os.path.join(ROOT, "data", QUICKSTART_SLICE.format(split="train")))
    with pytest.raises(ValueError, match="query ids are not in the data"):  # why the cut is needed
        check_utilities(load_utilities(shipped)[0], ds)
    cut = _shipped_for(ds, shipped, str(tmp_path))
    table, header = load_utilities(cut)
    check_utilities(table, ds)
    full, _ = load_utilities(shipped)
    assert table == {q: full[q] for q in full if q in table} and len(table) == 660
    assert header["n_queries"] == 660 and header["subset_of"] == DEFAULT_UTILITIES
    assert _shipped_for(ds.subset(), cut, str(tmp_path / "again")) == cut  # nothing to cut: the file itself


def test_data_dir_env_and_messages(tmp_path, monkeypatch):
    from uae_fast.data import quickstart_qasper_path, shipped_file

    monkeypatch.setenv("UAE_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"holds no qasper-train-v0\.3\.json\(\.gz\); pass --train-data FILE"):
        quickstart_qasper_path("train")
    (tmp_path / "qasper-dev-v0.3.json").write_text("{}")  # the official tarball's plain name
    assert quickstart_qasper_path("dev") == str(tmp_path / "qasper-dev-v0.3.json")
    with pytest.raises(FileNotFoundError, match="shipped data file nope.gz not found in .*; pass --x"):
        shipped_file("nope.gz", instead="--x")


def test_train_without_shipped_utilities_says_what_to_pass(monkeypatch, tmp_path):
    from uae_fast import data

    monkeypatch.setattr(data, "_shipped_dirs", lambda: [str(tmp_path)])
    from uae_fast.training import _default_utilities

    with pytest.raises(FileNotFoundError, match="pass --utilities FILE"):
        _default_utilities()


def test_shipped_slices_are_what_the_script_makes(tmp_path):
    from uae_fast.data import QUICKSTART_SLICE, default_qasper_path

    try:
        src = os.path.dirname(default_qasper_path("train"))
        default_qasper_path("dev")
    except FileNotFoundError:
        pytest.skip("the full QASPER splits are not here (set UAE_DATA_DIR)")
    if not src.endswith(os.path.join("shared", "data", "qasper")) and "UAE_DATA_DIR" not in os.environ:
        pytest.skip("not the official splits")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_qasper_slices.py"), "--source", src,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for split in ("train", "dev"):
        name = QUICKSTART_SLICE.format(split=split)
        # the uncompressed JSON, byte for byte (gzip output may differ between zlib builds)
        with gzip.open(tmp_path / name) as a, gzip.open(os.path.join(ROOT, "data", name)) as b:
            assert a.read() == b.read(), name


def test_slices_script_reads_the_release_as_unpacked(tmp_path):
    # the release tarball unpacks plain qasper-{train,dev}-v0.3.json; a folder without them is one error line
    from uae_fast.data import QUICKSTART_SLICE

    src = tmp_path / "release"
    src.mkdir()
    for split in ("train", "dev"):
        with gzip.open(os.path.join(ROOT, "data", QUICKSTART_SLICE.format(split=split))) as f:
            (src / f"qasper-{split}-v0.3.json").write_bytes(f.read())
    script = os.path.join(ROOT, "scripts", "make_qasper_slices.py")
    r = subprocess.run([sys.executable, script, "--source", str(src), "--out", str(tmp_path / "out"), "--train-papers", "3",
                        "--dev-queries", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all((tmp_path / "out" / QUICKSTART_SLICE.format(split=s)).exists() for s in ("train", "dev"))
    r = subprocess.run([sys.executable, script, "--source", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no qasper-train-v0.3.json(.gz) there" in r.stderr.strip().splitlines()[-1]


def test_bare_clone_resolves_the_quickstart_data(tmp_path):
    """`git clone` alone (no ../shared, no UAE_DATA_DIR, nothing installed from it): the quickstart's data,
    the shipped utilities table included, resolves inside the clone. Clones HEAD: commit to test changes."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    top = subprocess.run(["git", "-C", ROOT, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", ROOT, str(clone)], check=True, timeout=120)
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("UAE_DATA_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(clone)
    r = subprocess.run([sys.executable, "-m", "uae_fast", "quickstart", "--dry-run"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    for key in ("train_data", "dev_data", "utilities"):
        assert os.path.realpath(got[key]).startswith(os.path.realpath(clone / "data") + os.sep), (key, got[key])
    # --full needs the full splits and says how to give them
    r = subprocess.run([sys.executable, "-m", "uae_fast", "quickstart", "--dry-run", "--full"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        "uae quickstart: error: QASPER train split not found: pass --train-data FILE, or set UAE_DATA_DIR")


# ---------------------------------------------------------------------------------------- plot extra
def test_quickstart_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    from uae_fast.quickstart import plot_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_report({"eval": {}}, str(tmp_path / "report.png")) is False
    assert not (tmp_path / "report.png").exists()
    assert "pip install 'uae_fast[plot]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- model card
def test_saved_model_has_a_sentence_transformers_model_card(tmp_path):
    from test_student import make_tiny_encoder

    from uae_fast import BiEncoder
    from uae_fast.model_card import UAE_CITATION

    enc = BiEncoder(make_tiny_encoder(tmp_path / "src"), device="cpu")
    enc.save(tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    assert card.startswith("---\ntags:\n- sentence-transformers\n")
    assert "library_name: sentence-transformers" in card and "## Training Details" not in card
    assert f"- **Output Dimensionality:** {enc.dim} dimensions" in card
    assert f"- **Maximum Sequence Length:** {enc.max_seq_length} tokens" in card
    assert f"SentenceTransformer({os.path.normpath(str(tmp_path / 'plain'))!r})" in card
    assert UAE_CITATION in card and "2604.22722" in card

    summary = {"steps": 7, "final_loss": 1.25, "train_queries": 12, "world_size": 1,
               "config": {"loss": "uae", "data": "/x/qasper-train.json.gz", "utilities": "/y/u.jsonl.gz", "lr": 5e-5,
                          "teacher_temperature": 0.5, "teacher_gate": None}}
    enc.save(tmp_path / "trained", training=summary)
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "## Training Details" in card and "utility-modulated InfoNCE (UAE)" in card
    assert "- **Optimizer steps:** 7" in card and "- **Final loss:** 1.2500" in card
    assert "- **Training data:** qasper-train.json.gz" in card and "- `lr`: 5e-05" in card
    assert "teacher_gate" not in card  # unset options are not listed
    assert "Base model:** src" in card  # the encoder's folder, when the summary names no student
    # A resumed run's encoder comes from a checkpoint: the card names the run's --student. An answer-only run's
    # card says no evidence labels were read, and options its loss does not use are left out.
    ng = dict(summary, config=dict(summary["config"], student=str(tmp_path / "src"), no_gold=True,
                                   lexical_teacher="bm25-answer", label_mix=0.0, positive="gold"))
    enc.path = str(tmp_path / "run" / "checkpoints" / "step-000002")
    enc.save(tmp_path / "ng", training=ng)
    card = (tmp_path / "ng" / "README.md").read_text()
    assert "based on src" in card and "step-000002" not in card
    details = card.split("## Training Details")[1]
    assert "answer-only: no evidence labels read" in card and "gold passage" not in details and "gold evidence" not in details
    assert "- `no_gold`: True" in card and "- `lexical_teacher`: bm25-answer" in card
    assert "confidence" not in card  # the experimental options, off
    conf = dict(ng, config=dict(ng["config"], min_confidence=0.5, confidence_weight=True))
    enc.save(tmp_path / "conf", training=conf)
    card = (tmp_path / "conf" / "README.md").read_text()
    assert "largest probability is at least 0.5, each question's loss weighted by its target's largest" in card
    assert "- `min_confidence`: 0.5" in card and "- `confidence_weight`: True" in card
    weak = dict(summary, config=dict(ng["config"], loss="infonce", positive="bm25-answer", lexical_teacher="none"))
    enc.save(tmp_path / "weak", training=weak)
    card = (tmp_path / "weak" / "README.md").read_text()
    assert "InfoNCE with BM25's top-1 for the question and its answers as the positive" in card
    assert "teacher_temperature" not in card and "label_mix" not in card and "- `positive`: bm25-answer" in card
    assert "confidence" not in card and "Gemma" not in card
    # a Gemma teacher's table: the card names the teacher and the terms that may travel with a distilled model
    gem = dict(summary, teacher="gemma-3-270m", config=dict(summary["config"], utilities="/y/t.jsonl.gz"))
    enc.save(tmp_path / "gem", training=gem)
    card = (tmp_path / "gem" / "README.md").read_text()
    assert "- **Teacher:** gemma-3-270m" in card and "Gemma Terms of Use" in card
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tmp_path / "trained"), device="cpu")  # the card does not disturb loading
    assert model.encode(["a question?"]).shape == (1, enc.dim)


def test_default_student_card_names_its_hub_id(tmp_path):
    from test_student import require_default_student

    require_default_student()
    from uae_fast.model_card import DEFAULT_STUDENT_ID, model_card
    from uae_fast.student import default_student_path

    class Stub:  # the card needs only these attributes; loading the real model would cost seconds
        path = default_student_path()
        normalize, max_seq_length, do_lower_case, pooling_modes, dim = True, 256, False, ["mean"], 384
        model = type("BertModel", (), {"config": type("C", (), {"hidden_size": 384})})()

    card = model_card(Stub())
    assert f"base_model: {DEFAULT_STUDENT_ID}" in card and f"# SentenceTransformer based on {DEFAULT_STUDENT_ID}" in card


# ---------------------------------------------------------------------------------------- triton optional
def test_without_triton_auto_is_torch_and_triton_says_what_to_install(monkeypatch):
    import torch

    from uae_fast import _checks
    from uae_fast._checks import resolve_impl

    monkeypatch.setattr(_checks, "_TRITON_USABLE", {})  # not the cached answer of an earlier test
    monkeypatch.setitem(sys.modules, "triton", None)  # find_spec -> None, as when not installed
    assert resolve_impl("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_impl("triton", torch.device("cuda"))
