"""Writes deploy/kubernetes/base/prometheusrule.yaml, a Prometheus Operator PrometheusRule
(monitoring.coreos.com/v1) whose spec holds deploy/prometheus/rules.yaml's groups, so a
cluster's Prometheus loads the same recording rules and alerts as a plain Prometheus
does. kustomize cannot wrap a file into a custom resource's spec, so the manifest is
generated and committed; tests/e2e/test_kubernetes.py fails when it is out of step.

    python deploy/prometheus/prometheusrule.py           # rewrite the manifest
    python deploy/prometheus/prometheusrule.py --check   # exit 1 when it is out of step

Imports PyYAML and the standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
MANIFEST = ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/rules.yaml by `python deploy/prometheus/prometheusrule.py`:
# edit rules.yaml and run it again, never this file.
#
# Prometheus Operator: the recording rules and alerts of deploy/prometheus/rules.yaml for
# the gateways the ServiceMonitor scrapes. Needs the operator's CRDs
# (monitoring.coreos.com/v1); a Prometheus whose ruleSelector asks for labels loads it
# only with them (add them in an overlay).
"""
LABELS = {
    "app.kubernetes.io/name": "switchyard-gateway",
    "app.kubernetes.io/component": "gateway",
    "app.kubernetes.io/part-of": "switchyard",
}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line text (PromQL), as rules.yaml writes it."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def manifest(rules_text: str) -> str:
    """The PrometheusRule holding the groups of `rules_text` (a Prometheus rule file)."""
    rules: Any = yaml.safe_load(rules_text)
    if not isinstance(rules, dict) or set(rules) != {"groups"}:
        raise ValueError("a Prometheus rule file holds `groups` and nothing else")
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "switchyard-gateway", "labels": LABELS},
        "spec": {"groups": rules["groups"]},
    }
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when it is out of step")
    args = parser.parse_args(argv)
    wanted = manifest(RULES.read_text())
    if args.check:
        if not MANIFEST.exists() or MANIFEST.read_text() != wanted:
            print(f"{MANIFEST} is out of step with {RULES}: run {__file__}", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(wanted)
    print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
