#!/usr/bin/env python3
"""Drives real Helm (the Go SDK inside the helm-python-sdk package) for the
chart tests in e2e/tests/chart.rs and e2e/tests/rbac.rs.

    chart.py lint CHART [VALUES.yaml]
        Helm's lint (strict); prints the findings; exit 1 on any warning or error.
    chart.py render CHART [VALUES.yaml] [--namespace NS] [--name NAME] [--set K=V]...
        The CRDs (chart crds/) and the rendered templates as one YAML stream
        on stdout, as `helm template --include-crds` prints them.
    chart.py validate CHART VALUES.yaml
        Checks the values against values.schema.json; exit 1 with Helm's
        message when they are refused.
    chart.py install|upgrade CHART [VALUES.yaml] --kubeconfig KC [--namespace NS] [--name NAME] [--set K=V]...
    chart.py rollback|uninstall CHART --kubeconfig KC [--namespace NS] [--name NAME]
        A release's lifecycle against the cluster of KC, through Helm's SDK
        (Helm v4: server-side apply, release Secrets). Prints the release's
        name, revision and status as JSON; exit 1 with Helm's message on
        failure. `install` creates the namespace when it is missing.
"""

import argparse
import json
import sys

import helm_python as helm


def merge(base, over):
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def load_values(path, sets=()):
    values = None
    if path:
        with open(path, encoding="utf-8") as f:
            values = helm.values_from_yaml(f.read())
    for expression in sets:
        values = merge(values or {}, helm.parse_set_string(expression))
    return values


def lint(args):
    report = helm.lint(args.chart, load_values(args.values), strict=True, namespace=args.namespace)
    bad = False
    for m in report.get("messages") or []:
        print(f"severity {m.get('severity')}: {m.get('path')}: {m.get('error')}")
        bad = bad or (m.get("severity") or 0) >= 2
    for e in report.get("errors") or []:
        print(f"error: {e}")
        bad = True
    return 1 if bad else 0


def render(args):
    chart = helm.Chart.load(args.chart)
    values = load_values(args.values, args.set)
    chart.validate_schema(values)
    docs = []
    for crd in sorted(chart.crds, key=lambda c: c.get("name", "")):
        docs.append(f"# Source: {crd.get('name')}\n{crd.get('data', '').strip()}\n")
    manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    for path in sorted(manifests):
        text = manifests[path].strip()
        if not path.endswith(".yaml") or not text:
            continue
        for doc in text.split("\n---"):
            doc = doc.strip().removeprefix("---").strip()
            if doc and any(not l.startswith("#") for l in doc.splitlines() if l.strip()):
                docs.append(f"# Source: {path}\n{doc}\n")
    sys.stdout.write("---\n".join(docs))
    return 0


def validate(args):
    chart = helm.Chart.load(args.chart)
    try:
        chart.validate_schema(load_values(args.values))
    except helm.HelmError as e:
        print(e)
        return 1
    return 0


def release(args):
    config = helm.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace)
    try:
        if args.command == "install":
            result = config.install(args.chart, args.name, load_values(args.values, args.set),
                                    namespace=args.namespace, create_namespace=True, timeout=120)
        elif args.command == "upgrade":
            result = config.upgrade(args.chart, args.name, load_values(args.values, args.set),
                                    namespace=args.namespace, timeout=120)
        elif args.command == "rollback":
            config.rollback(args.name, timeout=120)
            result = config.status(args.name)
        else:
            result = config.uninstall(args.name, timeout=120).get("release", {})
    except helm.HelmError as e:
        print(f"helm {args.command} failed: {e}")
        return 1
    finally:
        config.close()
    info = result.get("info") or {}
    print(json.dumps({"name": result.get("name"), "revision": result.get("revision", result.get("version")),
                      "status": result.get("status", info.get("status"))}))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["lint", "render", "validate", "install", "upgrade",
                                            "rollback", "uninstall"])
    parser.add_argument("chart")
    parser.add_argument("values", nargs="?")
    parser.add_argument("--namespace", default="godwit-system")
    parser.add_argument("--name", default="godwit")
    parser.add_argument("--set", action="append", default=[], help="as helm's --set")
    parser.add_argument("--kubeconfig", help="the cluster, for the release commands")
    args = parser.parse_args()
    commands = {"lint": lint, "render": render, "validate": validate}
    return commands.get(args.command, release)(args)


if __name__ == "__main__":
    sys.exit(main())
