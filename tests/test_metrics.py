from bnlab.schema.metrics import Thresholds, higher_is_better


def test_accuracy_thresholds_record_the_first_crossing_only():
    t = Thresholds("test_acc", [0.90, 0.95, 0.97])
    for step, acc in [(0, 0.10), (100, 0.85), (200, 0.91), (300, 0.89), (400, 0.96), (500, 0.95), (600, 0.965)]:
        t.update(step, acc)
    assert t.reached == {0.9: 200, 0.95: 400, 0.97: None}


def test_several_thresholds_can_be_reached_at_one_step():
    t = Thresholds("train_acc", [0.5, 0.6])
    assert t.update(10, 0.7) == [0.5, 0.6]
    assert t.reached == {0.5: 10, 0.6: 10}


def test_loss_thresholds_are_reached_from_above():
    t = Thresholds("test_loss", [0.5, 0.1])
    for step, loss in [(0, 2.3), (50, 0.5), (100, 0.2), (150, 0.09)]:
        t.update(step, loss)
    assert t.reached == {0.5: 50, 0.1: 150}


def test_which_way_each_metric_improves():
    assert higher_is_better("test_acc") and higher_is_better("test_acc_precise_bn")
    assert not higher_is_better("train_loss")
