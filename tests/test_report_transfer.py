"""report_transfer: each training group's method is chosen by select_score, never test."""
import numpy as np

from mosaic_jax.report import transfer as report_transfer


def _r(train, test, layer, f1, sel):
    return dict(dataset='d', kind='sae', train_group=train, test_group=test, layer=layer,
                width='4k', variant='mean', macro_f1=str(f1), select_score=str(sel))


def test_matrix_rows_follow_the_validation_choice():
    rows = [_r('en', 'en', '3', 0.9, 0.5), _r('en', 'de', '3', 0.2, 0.5),   # better on test
            _r('en', 'en', '8', 0.7, 0.8), _r('en', 'de', '8', 0.6, 0.8),   # chosen on val
            _r('de', 'de', '3', 0.8, 0.7), _r('de', 'en', '3', 0.4, 0.7)]
    trains, tests, m = report_transfer.matrices(rows)['d', 'sae']
    assert trains == ['de', 'en'] and tests == ['de', 'en']
    np.testing.assert_allclose(m, [[0.8, 0.4], [0.6, 0.7]])
