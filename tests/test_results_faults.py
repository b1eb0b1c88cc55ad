"""The comparison tool on what real runs directories hold: crashed, copied and half-written runs, bad flags, a
crash while writing. Each case is one line or one failed row naming the file, with the right exit status."""
import csv
import json
import os
import subprocess
import sys

import pytest

from common.results import COLUMNS, main, write_results
from conftest import ROOT
from test_results import _pretrained, _results, _run

RECIPE = {"protocol": "paper", "bn": "frozen", "trainable_layers": 3, "lr": 0.02, "weight_decay": 1e-4}


def results_cli(capsys, *argv):
    """python -m common.results in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def _three_runs(root):
    """ft-scratch-s0 and ft-direct-s0 finished; ft-scratch-s1 finished too, for a test to break."""
    _run(root, "ft-scratch-s0", "scratch", 0, _results(0.30, 0.01, recipe=RECIPE, ft_flops=1e15))
    _run(root, "ft-scratch-s1", "scratch", 1, _results(0.32, 0.01, recipe=RECIPE, ft_flops=1e15))
    _run(root, "ft-direct-s0", "runs/direct/model_final.pth", 0,
         _results(0.40, 0.01, _pretrained("direct", 1e15, 2.0, 1.0), recipe=RECIPE, ft_flops=1e15))


def _edit(path, change):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(change(text))


def _edit_json(path, change):
    def edit(text):
        obj = json.loads(text)
        change(obj)
        return json.dumps(obj, indent=1)
    _edit(path, edit)


DEFECTS = {  # name: (file of ft-scratch-s1, how it is broken, the reason its row gives)
    "truncated": ("results.json", lambda t: _edit(t, lambda x: json.dumps(json.loads(x), indent=1)[:300]),
                  ": line "),  # where the parser stopped
    "not JSON": ("results.json", lambda t: _edit(t, lambda x: "<html>proxy error</html>"),
                 "Expecting value: line 1 column 1 (char 0)"),
    "a list": ("results.json", lambda t: _edit(t, lambda x: "[1, 2]"), "it is [1, 2], expected an object"),
    "no bbox": ("results.json", lambda t: _edit_json(t, lambda r: r.pop("bbox")), "it has no 'bbox'"),
    "no finetune": ("results.json", lambda t: _edit_json(t, lambda r: r.pop("finetune")), "it has no 'finetune'"),
    "no recipe.lr": ("results.json", lambda t: _edit_json(t, lambda r: r["finetune"]["recipe"].pop("lr")),
                     "finetune.recipe has no 'lr'"),
    "no bbox.APl": ("results.json", lambda t: _edit_json(t, lambda r: r["bbox"].pop("APl")), "bbox has no 'APl'"),
    "AP a string": ("results.json", lambda t: _edit_json(t, lambda r: r["bbox"].update(AP="0.3")),
                    "bbox.AP is '0.3', expected a number"),
    "pretrain a string": ("results.json", lambda t: _edit_json(t, lambda r: r.update(pretrain="x")),
                          "pretrain is 'x', expected an object"),
    "recipe.bn a list": ("results.json", lambda t: _edit_json(t, lambda r: r["finetune"]["recipe"].update(bn=[1])),
                         "finetune.recipe is {'protocol': 'paper', 'bn': [1], 'tra..., expected a protocol"),
    "recipe a number": ("results.json", lambda t: _edit_json(t, lambda r: r["finetune"].update(recipe=7)),
                        "finetune.recipe is 7, expected an object"),
    "not UTF-8": ("results.json", lambda t: open(t, "wb").write(b"\xff\xfe{"), "codec can't decode"),
    "args.json without init": ("args.json", lambda t: _edit_json(t, lambda a: a.pop("init")), "it has no 'init'"),
    "args.json cut": ("args.json", lambda t: _edit(t, lambda x: x[:20]), "Unterminated string"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_malformed_run_is_one_failed_row_naming_its_file(tmp_path, capsys, defect):
    """Every other row is written as before; the tool says which run failed and exits 1."""
    root = str(tmp_path / "runs")
    _three_runs(root)
    name, breaks, reason = DEFECTS[defect]
    breaks(os.path.join(root, "ft-scratch-s1", name))
    status, out, err = results_cli(capsys, root)
    assert status == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == "1 of 3 runs have no results: ft-scratch-s1 failed (the table says why)"
    rows = {(r["row"], r["status"].split(" (")[0]): r for r in csv.DictReader(open(os.path.join(root, "results.csv")))}
    failed = rows.pop(("scratch", f"failed: unreadable ft-scratch-s1/{name}"))
    assert reason in failed["status"] and failed["seeds"] == "1" and failed["AP"] == ""
    assert sorted(rows) == [("direct", "done"), ("scratch", "done")]
    assert rows["scratch", "done"]["AP"] == "0.3" and rows["scratch", "done"]["seeds"] == "0"
    assert f"| failed: unreadable ft-scratch-s1/{name} (" in out


@pytest.mark.parametrize("missing", [float("nan"), -1.0])
def test_nan_and_coco_minus_one_aps_are_missing_never_averaged(tmp_path, missing):
    """One of 3 seeds without an AP: the row's AP is the mean and std of the other two, that seed's AP n/a; with
    one seed left of a claim's pairs, no difference is made up (COCO's -1 means 'no value', not an AP)."""
    root = str(tmp_path / "runs")
    for seed, ap in enumerate((0.30, missing, 0.40)):
        _run(root, f"ft-scratch-s{seed}", "scratch", seed, _results(ap, 0.01, ft_flops=1e15))
        _run(root, f"ft-one-s{seed}", "runs/one/model_final.pth", seed,
             _results(0.5 if seed == 1 else missing, 0.01, _pretrained("direct", 1e15, 2.0, 1.0), ft_flops=1e15))
    rows, claims, _ = write_results(root, claims=["one > scratch"])
    scratch = next(r for r in rows if r["row"] == "scratch")
    assert scratch["AP"] == pytest.approx(0.35) and scratch["AP std"] == pytest.approx(0.0707107, rel=1e-5)
    assert scratch["AP by seed"] == "0.300 n/a 0.400"
    assert "| scratch | scratch | fasterrcnn | resnet18 | none | 100 it | ? | 0.350 ± 0.071 |" in open(
        os.path.join(root, "results.md")).read()
    claim = dict(claims)["one > scratch"]
    assert claim["verdict"] == "not evaluated: no seed gives an AP on both sides" and "diff" not in claim
    assert claim["dropped"] == ["0: one's AP n/a", "1: scratch curve incomplete: scratch's AP n/a", "2: one's AP n/a"]


def test_a_directory_that_cannot_be_listed_is_a_failed_row(tmp_path, capsys, monkeypatch):
    """os.walk's errors were dropped: the row vanished with exit 0 (a root user reads any directory, so the
    denial is simulated where os.walk lists it)."""
    root = str(tmp_path / "runs")
    _three_runs(root)
    locked = os.path.join(root, "ft-aligndet-s0")
    os.makedirs(locked)
    scandir = os.scandir

    def denying(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)
    monkeypatch.setattr(os, "scandir", denying)
    status, out, err = results_cli(capsys, root, "--expect", "ft-aligndet-s0")
    assert status == 1 and "ft-aligndet-s0 failed" in err
    assert "| aligndet | ? |" in out and "| failed: unreadable directory ft-aligndet-s0 (Permission denied) |" in out


def test_no_run_at_all_is_one_line_and_nothing_written(tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    status, _, err = results_cli(capsys, root)
    assert status == 2 and err == (f"error: {root}: no fine-tuning run under it (a directory whose args.json "
                                   "finetune.py wrote) and none --expect-ed; nothing written\n")
    assert os.listdir(root) == []
    status, out, err = results_cli(capsys, root, "--expect", "ft-scratch-s0")  # expected: a row saying so
    assert status == 1 and "| not run: neither it nor a pre-training stage of that name started" in out


@pytest.mark.parametrize("layout", ["copied under another seed's name", "an old/ subfolder", "one level up"])
def test_two_runs_of_one_row_and_seed_are_refused_naming_both(tmp_path, capsys, layout):
    """The table averaged both copies (seeds '0,0') while the claims used the last one: refused, exit 2."""
    top = tmp_path / "runs"
    root = str(top / "demo")
    _three_runs(root)
    copy = {"copied under another seed's name": f"{root}/ft-direct-s1", "an old/ subfolder": f"{root}/old/ft-direct-s0",
            "one level up": f"{top}/claims/ft-direct-s0"}[layout]
    os.makedirs(os.path.dirname(copy), exist_ok=True)
    subprocess.run(["cp", "-r", f"{root}/ft-direct-s0", copy], check=True)
    target = str(top) if layout == "one level up" else root
    status, _, err = results_cli(capsys, target)
    first, second = sorted([f"{root}/ft-direct-s0", copy])
    assert status == 2 and err.startswith(f"error: {first} and {second}: two runs of row direct, seed 0 (a copy? ")
    assert not os.path.exists(f"{target}/results.md")


@pytest.mark.parametrize("claim, message", [
    ("foo > scratch", "--claim 'foo > scratch': no row foo in the table (its rows: direct, scratch; names are "
                      "case-sensitive)"),
    ("Direct > Scratch", "--claim 'Direct > Scratch': no row Direct and no row Scratch in the table"),
    ("direct>", "--claim 'direct>': expected two different row names around one '>' (A better than B)"),
    (">scratch", "--claim '>scratch': expected two different row names"),
    ("direct>=scratch", "--claim 'direct>=scratch': expected two different row names"),
    ("direct > scratch > x", "--claim 'direct > scratch > x': expected two different row names"),
    ("direct > direct", "--claim 'direct > direct': expected two different row names"),
])
def test_a_claim_on_no_row_or_malformed_is_one_line(tmp_path, capsys, claim, message):
    root = str(tmp_path / "runs")
    _three_runs(root)
    status, out, err = results_cli(capsys, root, "--claim", claim)
    assert status == 2 and err.startswith("error: " + message) and len(err.splitlines()) == 1
    assert not os.path.exists(os.path.join(root, "results.md")) and out == ""


def test_a_crash_while_writing_keeps_the_previous_outputs(tmp_path):
    """A file-size limit of 2 KiB (ulimit -f 2) stops the write of a 4 KiB results.md half-way: one line, exit 2,
    every previous output intact, no temporary file left."""
    root = str(tmp_path / "runs")
    for i in range(1, 13):
        _run(root, f"ft-scratch-{i}x-s0", "scratch", 0, _results(0.01 * i, 0.01, ft_flops=i * 1e15))
    write_results(root)
    before = {name: open(os.path.join(root, name), "rb").read() for name in ("results.md", "results.csv",
                                                                                "results.png")}
    assert len(before["results.md"]) > 2048
    _run(root, "ft-direct-s0", "runs/direct/model_final.pth", 0, error="a new row: the table would change")
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); "
              "from common.results import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", script, root], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.endswith("File too large while writing the tables into " + root + "; every file there holds "
                                "its previous content or the new one in full\n"), proc.stderr
    assert {name: open(os.path.join(root, name), "rb").read() for name in before} == before
    assert not [name for name in os.listdir(root) if name.startswith(".tmp-")]


def test_out_that_is_a_file_and_expect_given_a_row_or_a_pretraining_are_one_line(tmp_path, capsys):
    root = str(tmp_path / "runs")
    _three_runs(root)
    os.makedirs(os.path.join(root, "montage-s0"))
    with open(os.path.join(root, "montage-s0", "args.json"), "w") as f:
        json.dump({"script": "montage.py", "seed": 0}, f)
    open(tmp_path / "taken", "w").close()
    cases = {("--out", tmp_path / "taken"): f"error: --out {tmp_path}/taken: a file; expected a directory to write "
                                            "the tables into",
             ("--expect", "scratch"): "error: --expect scratch: that is a row (its runs: ft-scratch-s0, "
                                      "ft-scratch-s1); --expect takes run directory names, e.g. ft-scratch-s0",
             ("--expect", "montage-s0"): f"error: --expect montage-s0: {root}/montage-s0 is a montage.py run, not a "
                                         "fine-tune; --expect takes the fine-tunes' run directory names (the one "
                                         "from it: ft-montage-s0)",
             ("--expect", "demo/ft-scratch-s0"): "error: --expect 'demo/ft-scratch-s0': expected a run directory's "
                                                 "name (e.g. ft-scratch-s0), not a path"}
    for flags, line in cases.items():
        status, _, err = results_cli(capsys, root, *flags)
        assert (status, err) == (2, line + "\n"), flags
    assert not os.path.exists(os.path.join(root, "results.md"))


def _cells(line):
    """A markdown table line's cells, split at unescaped '|' and unescaped (GitHub's rules)."""
    cells, cell, chars = [], "", iter(line.strip()[1:])
    for c in chars:
        if c == "\\":
            cell += next(chars)
        elif c == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += c
    return cells


def test_markdown_cannot_break_and_every_stop_says_how_far_it_got(tmp_path):
    """A '|', a backslash or a line break in a run's name or its error are escaped (each line keeps its cells);
    an empty error.txt says that no reason was recorded; a stopped run says 'of' how many iterations, and one
    trained to its end says it was never evaluated."""
    root = str(tmp_path / "runs")
    log = [{"iteration": 10}, {"iteration": 40}]
    _run(root, "ft-odd|na\\me\nx-s0", "scratch", 0, error="line one | with a pipe\nline two")
    _run(root, "ft-silent-s0", "scratch", 0, error=" ", log=log, iters=60)
    _run(root, "ft-stopped-s0", "scratch", 0, log=log, iters=60, max_iters=None)
    _run(root, "ft-capped-s0", "scratch", 0, log=log, iters=60, max_iters=50)
    _run(root, "ft-trained-s0", "scratch", 0, log=log + [{"iteration": 60}], iters=60)
    open(os.path.join(root, "ft-trained-s0", "model_final.pth"), "w").close()
    write_results(root)
    assert list(csv.reader(open(os.path.join(root, "claims.csv")))) == [[
        "claim", "against", "n", "seeds", "dropped seeds", "mean AP difference", "sd", "5% threshold (t x se)",
        "detectable at 80% power", "verdict"]]  # no claim: the header alone (no stale claims from an older table)
    lines = open(os.path.join(root, "results.md")).read().split("\n\n")[1].splitlines()
    assert len(lines) == 2 + 5 and all(len(_cells(line)) == len(COLUMNS) for line in lines)
    status = {_cells(line)[0]: _cells(line)[-1] for line in lines[2:]}
    assert status == {
        "odd|na\\me x": "failed: line one | with a pipe line two",
        "silent": "failed: no reason recorded (its error.txt is empty); stopped after iteration 40 of 60",
        "stopped": "incomplete: stopped after iteration 40 of 60",
        "capped": "incomplete: stopped after iteration 40 of 50",
        "trained": "incomplete: trained to its end (model_final.pth), never evaluated (no results.json): the same "
                   "command with --resume auto evaluates it"}


def test_help_names_the_command_and_defines_every_word_of_the_tables(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m common.results ")
    for word in ("  held  ", "  opposite  ", "  inconclusive  ", "  undecidable: REASON  ", "  not evaluated: REASON",
                 "skipped: REASON", "failed: REASON", "incomplete: REASON", "not run: REASON", "exit status: 0"):
        assert word in text, word


def _machine(cpu, capability="AVX2", threads=1, gpu=None):
    return {"cpu": cpu, "cpu_capability": capability, "threads": threads, "torch": "2.14.1", "gpu": gpu}


def test_every_table_names_the_machines_its_runs_ran_on(tmp_path):
    """One machine: one line. Several: one line per machine with the rows of its fine-tunes and pre-trainings;
    runs from before machines were recorded: 'unknown'. The CSV has each row's machines in a column."""
    root = str(tmp_path / "runs")
    cpu = _machine("AMD EPYC 7B13")
    _run(root, "ft-scratch-s0", "scratch", 0, _results(0.30, 0.01, ft_flops=1e15, machine=cpu))
    _run(root, "ft-direct-s0", "runs/direct/model_final.pth", 0,
         _results(0.40, 0.01, _pretrained("direct", 1e15, 2.0, 1.0, machine=cpu), ft_flops=1e15, machine=cpu))
    write_results(root)
    text = open(os.path.join(root, "results.md")).read()
    assert text.startswith("Machine: AMD EPYC 7B13 (AVX2, 1 thread), torch 2.14.1, GPU: none (every run of this "
                           "table).\n\n| row |")

    gpu = _machine("Intel Xeon 8480+", "AVX512", 16, gpu="NVIDIA H100 80GB HBM3")
    _run(root, "ft-montage-s0", "runs/montage/model_final.pth", 0,
         _results(0.35, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls", machine=gpu), ft_flops=1e15,
                  machine=cpu))
    _run(root, "ft-old-s0", "scratch", 0, _results(0.20, 0.01, ft_flops=1e15))  # no "machine": an older run
    _run(root, "ft-odd-s0", "scratch", 0, _results(0.20, 0.01, ft_flops=1e15, machine=["not", "a", "record"]))
    write_results(root)
    text = open(os.path.join(root, "results.md")).read()
    assert text.startswith(
        "Machines: the runs of this table do not all come from one machine:\n"
        "- AMD EPYC 7B13 (AVX2, 1 thread), torch 2.14.1, GPU: none: direct, direct (pre-training), montage, scratch\n"
        "- Intel Xeon 8480+ (AVX512, 16 threads), torch 2.14.1, GPU: NVIDIA H100 80GB HBM3: montage (pre-training)\n"
        "- unknown: odd, old\n\n| row |")
    machines = {r["row"]: r["machine"] for r in csv.DictReader(open(os.path.join(root, "results.csv")))}
    assert machines["montage"] == ("AMD EPYC 7B13 (AVX2, 1 thread), torch 2.14.1, GPU: none; Intel Xeon 8480+ (AVX512, "
                                   "16 threads), torch 2.14.1, GPU: NVIDIA H100 80GB HBM3")
    assert machines["old"] == "unknown"
