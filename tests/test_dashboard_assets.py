"""The dashboard page and its vendored libraries: served locally, pinned, unchanged."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from tests.test_stream_live import ROOT

VENDOR = ROOT / "static" / "vendor"


def _pinned() -> dict[str, str]:
    return dict(json.loads((VENDOR / "package.json").read_text())["dependencies"])


def _listed_checksums() -> dict[str, str]:
    text = (VENDOR / "README.md").read_text()
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)}


@pytest.mark.parametrize(
    ("file", "package", "banner"),
    [
        ("marked.umd.js", "marked", r"marked v(\S+) - a markdown parser"),
        ("purify.min.js", "dompurify", r"@license DOMPurify (\S+) "),
    ],
)
def test_vendored_file_is_the_pinned_release_with_its_licence(file: str, package: str, banner: str) -> None:
    text = (VENDOR / file).read_text()
    found = re.search(banner, text[:400])
    assert found, f"{file} has no version banner"
    assert found.group(1) == _pinned()[package]
    assert hashlib.sha256((VENDOR / file).read_bytes()).hexdigest() == _listed_checksums()[file]
    assert (VENDOR / f"{package}.LICENSE").stat().st_size > 500


def test_dashboard_page_loads_only_local_scripts_under_a_strict_policy(db: None) -> None:
    response = Client().get("/")
    assert response.status_code == 200
    html = response.content.decode()
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts == ["/static/vendor/marked.umd.js", "/static/vendor/purify.min.js", "/static/dashboard.js"]
    for src in scripts:
        assert finders.find(src.removeprefix("/static/")), src
    assert "<script>" not in html  # nothing inline: the policy forbids it
    policy = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', html)
    assert policy
    assert "script-src 'self';" in policy.group(1)
    assert "unsafe-inline" not in policy.group(1)
