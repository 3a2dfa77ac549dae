#!/usr/bin/env python3
"""Checks deploy/kustomization.yaml and deploy/kubernetes/*.yaml (Debian's python3-yaml): every
document parses and names its kind; each selector matches its pods; the replicas ask for a GPU,
are probed on /health and point --session-store at the Redis Service; the router mounts the
ConfigMap made from deploy/haproxy.cfg where haproxy reads it, and finds the replicas through the
headless Service on the port they listen on.
usage: check_kubernetes.py DEPLOY_DIR
"""
import os
import re
import sys

import yaml

failures = []


def expect(ok, what):
    if not ok:
        failures.append(what)
    return ok


def load(deploy):
    with open(os.path.join(deploy, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    objects = {}
    for res in kust["resources"]:
        with open(os.path.join(deploy, res)) as f:
            for doc in yaml.safe_load_all(f):
                if not expect(isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind")
                              and doc.get("metadata", {}).get("name"),
                              f"{res}: a document without apiVersion, kind or metadata.name"):
                    continue
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return kust, objects


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def port_of(c, name):
    return next((p["containerPort"] for p in c.get("ports", []) if p["name"] == name), None)


def arg(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def main():
    deploy = sys.argv[1]
    kust, objs = load(deploy)
    deployments = {n: d for (k, n), d in objs.items() if k == "Deployment"}
    services = {n: s for (k, n), s in objs.items() if k == "Service"}
    for name in ("multipole", "multipole-redis", "multipole-router"):
        expect(name in deployments, f"no Deployment {name}")
    for name in ("multipole-replicas", "multipole-redis", "multipole"):
        expect(name in services, f"no Service {name}")
    if failures:
        return
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        expect(d["spec"]["selector"]["matchLabels"].items() <= labels.items(),
               f"Deployment {name}: its selector does not match its pods")
    # Each Service selects the pods of one Deployment, on a port their container names.
    backing = {}
    for name, s in services.items():
        pods = [d for d in deployments.values()
                if s["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if expect(len(pods) == 1, f"Service {name} selects {len(pods)} Deployments"):
            backing[name] = pods[0]
            for p in s["spec"]["ports"]:
                expect(port_of(container(pods[0]), p["targetPort"]) is not None,
                       f"Service {name}: no container port named {p['targetPort']}")

    # The replicas.
    rep = deployments["multipole"]
    c = container(rep)
    args = c["command"] + c["args"]
    http_port = port_of(c, "http")
    expect(rep["spec"]["replicas"] >= 2, "fewer than two replicas")
    for kind in ("requests", "limits"):
        expect(c["resources"][kind].get("nvidia.com/gpu") == 1, f"replica: {kind} of nvidia.com/gpu != 1")
    for probe in ("readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet", {})
        expect(get.get("path") == "/health" and get.get("port") in ("http", http_port),
               f"replica: {probe} is not GET /health on its port")
    expect(arg(args, "--port") == str(http_port), "replica: --port is not its container port")
    expect(arg(args, "--host") == "0.0.0.0", "replica: --host is not 0.0.0.0")
    m = re.fullmatch(r"redis://([^:/]+):(\d+)", arg(args, "--session-store") or "")
    if expect(m, "replica: no --session-store redis://SERVICE:PORT"):
        redis = services.get(m.group(1))
        expect(redis and backing.get(m.group(1)) is deployments["multipole-redis"],
               f"replica: --session-store names {m.group(1)}, not the Redis Service")
        expect(redis and int(m.group(2)) in [p["port"] for p in redis["spec"]["ports"]],
               "replica: --session-store's port is not the Redis Service's")
    headless = services["multipole-replicas"]
    expect(headless["spec"].get("clusterIP") == "None", "multipole-replicas is not headless")
    expect(backing.get("multipole-replicas") is rep, "multipole-replicas does not select the replicas")

    # The router: haproxy.cfg from the ConfigMap, the replicas through the headless Service.
    gen = {g["name"]: g for g in kust.get("configMapGenerator", [])}
    expect("haproxy.cfg" in gen.get("multipole-router", {}).get("files", []),
           "no ConfigMap multipole-router made from haproxy.cfg")
    with open(os.path.join(deploy, "haproxy.cfg")) as f:
        cfg = f.read()
    router = deployments["multipole-router"]
    rc = container(router)
    spec = router["spec"]["template"]["spec"]
    volume = next((v for v in spec["volumes"] if v.get("configMap", {}).get("name") == "multipole-router"), None)
    mount = volume and next((m for m in rc["volumeMounts"] if m["name"] == volume["name"]), None)
    expect(mount and arg(rc["args"], "-f") == mount["mountPath"] + "/haproxy.cfg",
           "router: haproxy does not read the ConfigMap's haproxy.cfg")
    env = {e["name"]: e for e in rc["env"]}
    dns = env.get("MULTIPOLE_REPLICAS_DNS", {}).get("value", "")
    expect(dns.startswith("multipole-replicas.") and dns.endswith(".svc.cluster.local"),
           f"router: MULTIPOLE_REPLICAS_DNS {dns!r} is not the headless Service's full name")
    for ref in re.findall(r"\$\((\w+)\)", dns):
        expect(ref in env and list(env).index(ref) < list(env).index("MULTIPOLE_REPLICAS_DNS"),
               f"router: MULTIPOLE_REPLICAS_DNS uses $({ref}), not defined before it")
    template = re.search(r'server-template \S+ \d+ "\$\{MULTIPOLE_REPLICAS_DNS\}:(\d+)"', cfg)
    expect(template and int(template.group(1)) == http_port,
           "haproxy.cfg's server-template port is not the replicas' port")
    bind = env.get("MULTIPOLE_ROUTER_BIND", {}).get("value", "")
    expect(bind.endswith(":" + str(port_of(rc, "http"))), "router: it listens on another port than its container's")
    for p in services["multipole"]["spec"]["ports"]:
        expect(p["targetPort"] in ("http", port_of(rc, "http")), "Service multipole: not the router's port")
    print(f"{len(objs)} objects: " + ", ".join(f"{k} {n}" for k, n in sorted(objs)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main()
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    sys.exit(1 if failures else 0)
