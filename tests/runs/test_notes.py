"""What people read: links into the MLflow UI (model-training mode), the runs-table view, and
the descriptions of the experiment, a run, the registered model and a version."""

from pipeline.handoffs import Promotion
from pipeline.runs import notes


def test_ui_routes_open_model_training_mode():
    assert notes.runs_route("3") == ("#/experiments/3/runs?workflowType=machine_learning"
                                     "&viewStateShareKey=model-training")
    assert notes.runs_route("3", view=False) == \
        "#/experiments/3/runs?workflowType=machine_learning"
    assert notes.run_route("3", "abc") == \
        "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert notes.model_route("food101 resnet") == \
        "#/models/food101%20resnet?workflowType=machine_learning"
    assert notes.version_route("m", "2") == "#/models/m/versions/2?workflowType=machine_learning"
    assert notes.ui_route("compare-runs?runs=x") == \
        "#/compare-runs?runs=x&workflowType=machine_learning"


def test_the_runs_view_puts_the_test_metrics_first_best_first():
    view = notes.runs_view_state()
    assert view["orderByKey"] == "metrics.`test_accuracy`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:3] == ["metrics.`test_accuracy`",
                                           "metrics.`test_top5_accuracy`",
                                           "metrics.`test_macro_f1`"]


def test_experiment_note_links_the_view_and_the_champion():
    text = notes.experiment_note("food101", "7", "dishes")
    assert notes.runs_route("7") in text
    assert notes.model_route("dishes") in text and "`models:/dishes@champion`" in text


def test_run_note_lists_what_differs_from_the_committed_baseline():
    changes = [("model.new", None, 1), ("sample.classes", "all", ["a|b", "c"]),
               ("train.lr", 0.003, 0.01)]
    note = notes.run_note(changes, "0123456789abcdef", False, {"data": "4 images"})
    assert "`params.yaml` at git commit `0123456789`):" in note
    assert "| `train.lr` | 0.003 | **0.01** |" in note
    assert '| `sample.classes` | all | **["a\\|b", "c"]** |' in note  # a pipe cannot split a cell
    assert note.endswith("\n\n- data: 4 images")
    assert "no param differs" in notes.run_note([], "abc", False, {})
    assert "with uncommitted changes" in notes.run_note([], "abc", True, {})
    assert "unknown" in notes.run_note(None, "abc", False, {})
    assert "no git repository here" in notes.run_note(None, None, None, {})
    assert notes.run_note([], "abc", False, {}, "exp-1").endswith("DVC experiment `exp-1`.")


def test_a_section_is_replaced_not_repeated():
    note = notes.with_section("head", "Evaluation", "first")
    note = notes.with_section(note, "Predict", "p")
    note = notes.with_section(note, "Evaluation", "second")
    assert note == "head\n\n### Predict\np\n\n### Evaluation\nsecond"


def _decision(promoted: bool = True) -> Promotion:
    return Promotion(model_name="m", version="3", test_accuracy=0.61234,
                     test_manifest_sha256="ab" * 32, min_delta=0.0, champion_version="2",
                     champion_test_accuracy=0.6, decided_at="", promoted=promoted,
                     reason="test_accuracy 0.6123 beats champion v2's 0.6000", run_id="r")


METRICS = {"test_accuracy": 0.61234, "test_top5_accuracy": 0.9, "test_macro_f1": 0.6}


def test_version_note_has_the_metrics_the_manifest_the_run_and_the_decision():
    text = notes.version_note(METRICS, "data/manifests/test.csv", 1000, "ab" * 32,
                              "lr=0.01", "#/experiments/1/runs/r", _decision())
    assert text.splitlines()[0] == ("test_accuracy 0.6123 · test_top5_accuracy 0.9000 · "
                                    "test_macro_f1 0.6000")
    assert "`data/manifests/test.csv` (1000 images, sha256 `abababababab`)" in text
    assert "Run [lr=0.01](#/experiments/1/runs/r)." in text
    assert text.endswith("**promoted to champion**: test_accuracy 0.6123 beats champion "
                         "v2's 0.6000.")


def test_evaluation_section_links_the_version_and_says_the_verdict():
    text = notes.evaluation_section("m", "3", METRICS, "data/manifests/test.csv", 20,
                                    _decision(promoted=False))
    assert text.startswith(f"Registered as [m v3]({notes.version_route('m', '3')}): "
                           "**not promoted**")
    assert "test_accuracy **0.6123**" in text and "(20 images)" in text
    assert "load_model(\"models:/m@champion\")" in notes.model_note("m")
