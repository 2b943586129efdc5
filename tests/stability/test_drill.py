import io

from stability.cli import build_parser, resolve
from stability.drill import _outcome, battery, drill


def test_battery_covers_every_site_and_kind_and_plasticity_only_with_stdp():
    faults = battery(10, plasticity=False)
    assert len(faults) == 13 and not any(f.startswith("plasticity") for f in faults)
    sites = {f.split(":")[0].split("[")[0].split("@")[0] for f in faults}
    assert sites == {"loss", "grad", "activation", "param", "overflow"}
    assert {"nan", "inf", "-inf", "spike", "jump"} <= {f.split(":")[1].split("@")[0] for f in faults if ":" in f}
    assert battery(10, plasticity=True)[-2:] == ["plasticity:nan@10", "plasticity:spike@10"]
    assert battery(10, plasticity=False, preemption=True)[-1] == "sigterm@10"


def test_outcome_of_a_preemption_that_resumed():
    o = _outcome("sigterm@10", 0, [{"kind": "preempted"}, *_recs()])
    assert (o.detected, o.skipped, o.steps_to_recover) == (True, 0, 0)


def _recs(*extra):
    return [*extra, {"kind": "step", "step": 20, "spikes_clipped": 0}, {"kind": "epoch", "val_loss": 4.2}]


def test_outcome_of_a_single_skip():
    o = _outcome("loss:nan@10", 0, _recs({"kind": "skip", "step": 10}))
    assert (o.detected, o.skipped, o.rollbacks, o.steps_to_recover, o.final_loss) == (True, 1, 0, 1, 4.2)


def test_outcome_of_a_rollback_counts_skipped_and_replayed_steps():
    recs = _recs(*({"kind": "skip", "step": s} for s in (10, 11, 12)),
                 {"kind": "rollback", "step": 12, "to_step": 8})
    o = _outcome("param:nan@10", 0, recs)
    assert (o.skipped, o.rollbacks, o.steps_to_recover) == (3, 1, 3 + 4)


def test_outcome_of_a_clipped_spike_or_dropped_plasticity_update_is_detected():
    clipped = [{"kind": "step", "step": 20, "spikes_clipped": 1}, {"kind": "epoch", "val_loss": 4.0}]
    assert _outcome("grad:spike@10", 0, clipped).detected
    dropped = [{"kind": "step", "step": 20, "spikes_clipped": 0, "plasticity": {"dropped": [1, 0], "clipped": [0, 0]}},
               {"kind": "epoch", "val_loss": 4.0}]
    assert _outcome("plasticity:nan@10", 0, dropped).detected
    assert not _outcome("loss:nan@10", 0, _recs()).detected


def test_drill_fails_when_the_guard_is_off(tmp_path):
    spec = resolve(build_parser().parse_args(
        ["drill", "--phase", "1", "--tiny", "--no-guard", "--max-steps", "12", "--eval-batches", "2"]))
    out = io.StringIO()
    assert drill(spec, out) == 1
    text = out.getvalue()
    assert "not survived" in text and "loss:nan@3" in text
    # and it said how far it got after every run, not only at the end
    lines = [line for line in text.splitlines() if line.startswith("drill: ") and "/" in line.split()[1]]
    assert lines[0].startswith("drill: 1/") and "control" in lines[0]
    total = int(lines[0].split()[1].split("/")[1])
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(1, total + 1))

