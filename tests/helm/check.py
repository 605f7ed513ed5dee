"""Lints and renders charts/tenantry with the real Helm engine (helm-python-sdk).

usage: check.py lint CHART VALUES...        lint (strict) and render with each values file
       check.py bad CHART                   bad values must fail at install time with a clear message
       check.py install KUBECONFIG NAMESPACE CHART RELEASE VALUES_JSON
"""
import json
import sys

import helm_python


def load_values(path):
    return helm_python.values_from_yaml(open(path).read()) if path else {}


def lint(chart, values_files):
    for vf in [None] + values_files:
        values = load_values(vf) if vf else {"database": {"existingSecret": "db"}}
        report = helm_python.lint(chart, values, strict=True, kube_version="v1.30.0")
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        if report.get("errors") or problems:
            sys.exit(f"lint {vf or 'defaults'}: {report}")
        rendered = helm_python.Chart.load(chart).render(values, name="tenantry", namespace="tenantry-system", is_install=True)
        kinds = sorted({line.split(":", 1)[1].strip() for text in rendered.values() for line in text.splitlines() if line.startswith("kind:")})
        print(json.dumps({"values": vf or "defaults", "templates": len(rendered), "kinds": kinds}))


def bad(chart):
    cases = [
        ({}, "existingSecret"),
        ({"database": {"existingSecret": "db"}, "operator": {"replicas": 2, "leaderElection": False}}, "leaderElection"),
        ({"database": {"existingSecret": "db"}, "log": {"format": "xml"}}, "format"),
        ({"database": {"existingSecret": "db"}, "api": {"poolSize": 0}}, "poolSize"),
        ({"database": {"existingSecret": "db"}, "watchNamespaces": ["Not A Namespace"]}, "watchNamespaces"),
        ({"database": {"existingSecret": "db"}, "typo": True}, "typo"),
    ]
    for values, needle in cases:
        try:
            helm_python.Chart.load(chart).render(values, name="t", namespace="x", is_install=True)
        except helm_python.HelmError as e:
            if needle not in str(e):
                sys.exit(f"values {values}: error does not mention {needle!r}: {e}")
            print(f"refused as expected: {needle}: {str(e).splitlines()[0][:160]}")
            continue
        sys.exit(f"values {values} were accepted")


def install(kubeconfig, namespace, chart, release, values_json):
    cfg = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    cfg.install(chart, release, json.loads(values_json), namespace=namespace, create_namespace=True)
    summary = cfg.status(release)
    status = summary.get("status") or (summary.get("info") or {}).get("status")
    print(json.dumps({"release": release, "status": status, "keys": sorted(summary)}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "lint":
        lint(args[0], args[1:])
    elif cmd == "bad":
        bad(args[0])
    elif cmd == "install":
        install(*args)
    else:
        sys.exit(__doc__)
