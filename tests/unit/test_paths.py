"""One resolver of a run's folders: run_dir defaults, a section's output_dir, the cross-section defaults,
the record in config.yaml, and every reader (eval, the stages' stamps, the report) agreeing with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli
from cptkit.commands import eval as eval_cmd
from cptkit.config import Config, build_config, load_config
from cptkit.errors import CptkitError
from cptkit.outputs import write_config
from cptkit.paths import Paths, resolve
from cptkit.pipeline.stages import STAGES, sft_eval_config
from cptkit.testing.stages import write_metrics, write_prepared


def config(**sections) -> Config:
    return build_config(Config, sections)


def stage(name: str):
    return next(s for s in STAGES if s.name == name)


def test_run_dir_only_puts_every_stage_in_its_default_folder(tmp_path):
    run = tmp_path / "run"
    paths = resolve(
        config(
            run_dir=str(run), model={"name_or_path": "org/base"}, train={}, merge={}, sft={"data": __file__}
        )
    )
    assert paths.merge_base == "org/base" and paths.sft_base == str(run / "merged")
    assert paths.prepared == paths.eval_dataset == paths.merge_dataset == run / "data"
    assert (paths.data, paths.train, paths.merged, paths.eval) == (
        run / "data",
        run / "train",
        run / "merged",
        run / "eval",
    )
    assert (paths.sft, paths.sft_eval, paths.report) == (run / "sft", run / "sft/eval", run / "report")
    assert paths.train_meta == run / "train/run_meta.json" and paths.manifest == run / "data/manifest.json"
    assert paths.eval_results == run / "eval/results.json" and paths.report_md == run / "report/report.md"


def test_output_dirs_only_resolve_without_run_dir_and_the_rest_is_none(tmp_path):
    cfg = config(
        model={"name_or_path": "org/base"},
        train={"mode": "full", "output_dir": str(tmp_path / "t"), "dataset": str(tmp_path / "ds")},
        eval={"output_dir": str(tmp_path / "e")},
    )
    paths = resolve(cfg)
    assert paths.run_dir is None and paths.data is None and paths.report is None and paths.merged is None
    assert paths.prepared == tmp_path / "ds" and paths.eval_dataset == tmp_path / "ds"
    assert paths.train == tmp_path / "t" and paths.eval == tmp_path / "e"
    assert paths.sft_base == str(tmp_path / "t")  # a fully trained CPT model is what SFT starts from
    assert paths.merge_report is None and paths.report_json is None
    with pytest.raises(
        CptkitError, match="report: no output folder: set run_dir or the section's output_dir"
    ):
        paths.folder("report")
    assert cfg.stage_dir("train") == tmp_path / "t"


def test_a_mix_of_run_dir_and_own_folders_and_the_cross_section_defaults(tmp_path):
    run = tmp_path / "run"
    cfg = config(
        run_dir=str(run),
        model={"name_or_path": "org/base"},
        train={"output_dir": str(tmp_path / "adapter"), "dataset": str(tmp_path / "prepared")},
        merge={"base": "org/other", "dataset": str(tmp_path / "compare")},
        eval={},
        sft={"data": __file__, "model": "org/chat", "output_dir": str(tmp_path / "sft")},
    )
    paths = resolve(cfg)
    assert paths.data == run / "data" and paths.prepared == tmp_path / "prepared"
    assert paths.train == paths.adapter == tmp_path / "adapter" and paths.merged == run / "merged"
    assert paths.merge_base == "org/other" and paths.merge_dataset == tmp_path / "compare"
    assert paths.eval_dataset == tmp_path / "prepared"  # eval reads what train trained on
    assert paths.sft_base == "org/chat" and paths.sft_eval == tmp_path / "sft/eval"
    assert sft_eval_config(cfg).eval.output_dir == str(tmp_path / "sft/eval")
    # the stages' stamps and markers watch those same files
    assert stage("prepare").marker(cfg) == run / "data/manifest.json"
    assert stage("train").inputs(cfg) == [tmp_path / "prepared/manifest.json"]
    assert stage("eval").inputs(cfg)[0] == tmp_path / "prepared/manifest.json"
    assert stage("sft").marker(cfg) == tmp_path / "sft/run_meta.json"


def test_sft_starts_from_the_base_model_without_cpt_stages():
    cfg = config(run_dir="r", model={"name_or_path": "org/base"}, sft={"data": __file__})
    assert resolve(cfg).sft_base == "org/base"
    assert resolve(config(run_dir="r")).sft_base is None


def test_sft_eval_runs_no_interpolation_sweep_the_cpt_eval_runs():
    # the sweep is between the base and the CPT model (`adapted`), which the SFT eval has no model named
    from cptkit.eval.interpolate import plan_sweep

    cfg = config(
        run_dir="r",
        model={"name_or_path": "org/base"},
        train={},
        eval={"interpolate": [0.5, 1.0]},
        sft={"data": __file__},
    )
    sft_eval = sft_eval_config(cfg).eval
    assert sft_eval.interpolate == [] and cfg.eval.interpolate == [0.5, 1.0]
    assert plan_sweep(sft_eval.interpolate, sft_eval.models, None) is None


def test_written_config_records_the_paths_and_loads_back_as_it_was(tmp_path):
    cfg = config(run_dir=str(tmp_path / "run"), train={"output_dir": str(tmp_path / "t")}, eval={})
    write_config(tmp_path / "run/eval", cfg)
    written = tmp_path / "run/eval/config.yaml"
    assert yaml.safe_load(written.read_text())["paths"]["train"] == str(tmp_path / "t")
    assert load_config(Config, written) == cfg
    assert load_config(Config, written, ["train.output_dir=x"]).train.output_dir == "x"


def test_run_dir_read_through_recorded_paths_even_when_moved(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    cfg = config(run_dir=str(old), train={"output_dir": str(tmp_path / "elsewhere")}, eval={})
    write_config(old / "eval", cfg)
    old.rename(new)
    paths = Paths.of_run_dir(new)
    assert paths.train == tmp_path / "elsewhere" and paths.eval == new / "eval" and paths.run_dir == new
    assert Paths.of_run_dir(tmp_path / "plain") == Paths.under(tmp_path / "plain")


def test_report_of_a_config_sees_a_train_stage_with_its_own_output_dir(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    write_metrics(elsewhere, steps=4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run), "train": {"output_dir": str(elsewhere)}}))
    run.mkdir()
    assert cli(["report", str(path)]) == 0
    assert json.loads((run / "report/report.json").read_text())["train"]["final_step"] == 4
    # the run folder alone: its stages' config.yaml say where train wrote
    write_config(run / "eval", load_config(Config, path))
    (run / "report/report.json").unlink()
    assert cli(["report", str(run)]) == 0
    assert json.loads((run / "report/report.json").read_text())["train"]["final_step"] == 4


def test_report_of_a_run_folder_takes_no_overrides(tmp_path, capsys):
    assert cli(["report", str(tmp_path), "run_dir=x"]) == 2
    assert "overrides need a config file" in capsys.readouterr().err


def test_eval_scores_the_dataset_train_trained_on(tmp_path, tiny_model_dir, tiny_tokenizer):
    """train.dataset set: eval reads its held-out sets, which is what the eval stage's stamp watches."""
    dataset = write_prepared(tmp_path / "prepared", {"only": ("domain", ["a held-out text"])}, tiny_tokenizer)
    cfg = config(
        run_dir=str(tmp_path / "run"),
        model={"name_or_path": str(tiny_model_dir)},
        train={"dataset": str(dataset)},
        eval={"device": "cpu"},
    )
    result = eval_cmd.run(cfg)
    assert {r["set"] for r in result["results"]} == {"only"}
    assert Path(dataset / "manifest.json") in stage("eval").inputs(cfg)


def test_run_folder_of_a_config_without_run_dir_reports_into_it(tmp_path):
    """Stages whose config set only their own output_dir: the run folder still gets its report."""
    run = tmp_path / "run"
    cfg = config(train={"output_dir": str(run / "train")}, eval={"output_dir": str(run / "eval")})
    write_config(run / "eval", cfg)
    paths = Paths.of_run_dir(run)
    assert paths.report == run / "report" and paths.eval == run / "eval"


def test_the_model_sft_starts_from_moves_with_the_run_folder(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    old, new = tmp_path / "old", tmp_path / "new"
    cfg = config(
        run_dir=str(old), model={"name_or_path": "base"}, merge={}, sft={"data": str(tmp_path / "x.jsonl")}
    )
    write_config(old / "sft", cfg)
    old.rename(new)
    paths = Paths.of_run_dir(new)
    assert paths.sft_base == str(new / "merged") and paths.merge_base == "base"


def test_report_names_what_it_could_not_find(tmp_path, capsys):
    assert cli(["report", str(tmp_path / "runs" / "dmeo")]) == 2
    assert "no such run folder or config file" in capsys.readouterr().err
    path = tmp_path / "no_run_dir.yaml"
    path.write_text(yaml.safe_dump({"eval": {"output_dir": str(tmp_path / "e")}}))
    assert cli(["report", str(path)]) == 2
    assert "run_dir is not set" in capsys.readouterr().err
