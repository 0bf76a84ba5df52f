"""The report of a tiny run, rendered in a real browser (headless Chromium via Playwright):
every image loads, the feature explanations are there, and the page logs no errors."""
import os
import shutil

import pytest

from tests import test_pipeline
from tests.test_pipeline import tiny  # noqa: F401  (fixture)

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is in the test extra')
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                             ".ci/run installs it)")


def test_report_renders_in_chromium(tiny, tmp_path):  # noqa: F811
    r = test_pipeline._main(tiny, tmp_path, '--config.run_id=b', '--config.report=True',
                            '--config.cv_folds=0', "--config.baselines=('hidden_last','tfidf')",
                            '--config.probe.sparse_k=(1,4)')
    assert r.returncode == 0, r.stderr[-3000:]
    page_path = os.path.join(tmp_path, 'report.html')
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        page = browser.new_page(viewport={'width': 1366, 'height': 900})
        page.on('console', lambda m: problems.append(m.text) if m.type == 'error' else None)
        page.on('pageerror', lambda e: problems.append(str(e)))
        page.on('requestfailed', lambda q: problems.append(f'failed: {q.url}'))
        page.goto(f'file://{page_path}', wait_until='load')
        images = page.evaluate('Array.from(document.images).map('
                               'i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0])')
        text = page.inner_text('body')
        marks = page.locator('mark').count()
        shot = page.screenshot(full_page=True)
        browser.close()
    assert problems == []
    assert len(images) >= 4 and all(ok for _, ok in images), images
    assert 'What the top features respond to' in text and marks > 0
    assert 'k-sparse probes' in text
    assert shot[:8] == b'\x89PNG\r\n\x1a\n' and len(shot) > 20_000
