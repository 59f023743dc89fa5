"""The early-stopping rule (eval.patience, eval.patience_steps): validations without improvement and
optimizer steps since the best validation must both run out."""

import pytest

from trainer.worker.loop import patience_spent


@pytest.mark.parametrize("bad, since_best, patience, patience_steps, spent", [
    (3, 500, 0, 0, False),  # patience 0: never
    (2, 500, 3, 200, False),  # too few bad validations, however many steps
    (3, 500, 3, 200, True),
    (3, 199, 3, 200, False),  # tiny epochs: three bad validations within a few dozen steps are not enough
    (40, 199, 3, 200, False),
    (3, 200, 3, 200, True),
    (3, 1, 3, 0, True),  # patience_steps 0: validations alone, the rule before patience_steps existed
])
def test_patience_needs_both_validations_and_steps(bad, since_best, patience, patience_steps, spent):
    assert patience_spent(bad, since_best, patience, patience_steps) is spent
