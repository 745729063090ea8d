"""Offline checks of the cluster deployment files under cluster/.

Nothing is deployed: the Ray autoscaler configs go through Ray's own schema and
config preparation (what `ray up` does before it calls a cloud API), the
Kubernetes manifests are checked for the shape KubeRay needs, and every file is
checked for public exposure and for secrets written in plain text.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AUTOSCALER = ["aws.yaml", "gcp.yaml"]
EXPECTED = AUTOSCALER + ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                         "mlflow/mlflow.yaml", "mlflow/postgres.yaml", "mlflow/kustomization.yaml"]
PLACEHOLDER = re.compile(r"YOUR_|REPLACE|ACCOUNT_ID|PASSWORD|\.\.\.|^\$|^\"\$|^%s$|^<")
# GPUs per instance type, where the configs name them.
GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8,
        "p3.2xlarge": 1, "p3.8xlarge": 4, "g2-standard-8": 1, "g2-standard-24": 2, "g2-standard-48": 4}


def _ray_version() -> str:
    from importlib.metadata import version
    return version("ray")


def load_all(rel: str) -> list[dict]:
    with open(CLUSTER / rel) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load(rel: str) -> dict:
    docs = load_all(rel)
    assert len(docs) == 1, f"{rel}: expected one YAML document"
    return docs[0]


def walk(node, path=()):
    """Every (path, key, value) in nested dicts and lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def all_yaml() -> list[str]:
    return sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.y*ml"))


def k8s_docs() -> list[tuple[str, dict]]:
    return [(rel, d) for rel in all_yaml() if rel not in AUTOSCALER for d in load_all(rel)]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def from_secret(env: dict, name: str) -> bool:
    ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
    return bool(ref.get("name") and ref.get("key")) and "value" not in env.get(name, {})


# ---------------------------------------------------------------- all files

def test_every_expected_file_exists_and_parses():
    files = all_yaml()
    for rel in EXPECTED:
        assert rel in files, f"cluster/{rel} is missing"
    for rel in files:
        assert load_all(rel), f"cluster/{rel} is empty"
    assert (CLUSTER / "README.md").is_file()
    assert (CLUSTER / "mlflow" / "run-server.sh").is_file()


def test_no_plaintext_secrets_anywhere():
    """`password:`/`password=` values and credentials inside URIs are references or placeholders."""
    # `key: value` (YAML), `key = value` / `KEY=value` (ini, shell); not `${KEY:-}`.
    kv = re.compile(r"(?i)\b\w*(password|passwd|secret[_-]?key|token)[\"']?\s*(?::\s|=)\s*([^\s,}]+)")
    uri = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@\"']+:([^@\s/\"']+)@")
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        for m in kv.finditer(text):
            value = m.group(2).strip("\"'")
            if value in ("", "|", ">") or value.startswith(("{", "$", "%", "(")) or PLACEHOLDER.search(value):
                continue
            # YAML keys naming a secret (e.g. `key: admin-password`) are references, not values.
            line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.end())]
            if re.search(r"\b(key|name|secretKeyRef)\b", line) or "--from-literal" in line:
                continue
            raise AssertionError(f"{path.relative_to(CLUSTER.parent)}: plaintext secret? {line.strip()!r}")
        for m in uri.finditer(text):
            assert PLACEHOLDER.search(m.group(1)) or m.group(1).startswith("$"), \
                f"{path.relative_to(CLUSTER.parent)}: credentials inside a URI: {m.group(0)!r}"
    # In the manifests, every env var that names a secret takes it from a Secret.
    for rel, doc in k8s_docs():
        for _, k, v in walk(doc):
            if k == "env" and isinstance(v, list):
                for e in v:
                    if re.search(r"PASSWORD|SECRET|TOKEN|STORE_URI|DATABASE_URI", e["name"]):
                        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), \
                            f"cluster/{rel}: {e['name']} must come from a secretKeyRef"
        assert doc.get("kind") != "Secret", f"cluster/{rel}: Secrets are created with kubectl, not committed"


def test_nothing_is_exposed_publicly():
    for rel, doc in k8s_docs():
        assert doc.get("kind") not in ("Ingress", "Gateway", "HTTPRoute"), f"cluster/{rel}: public route"
        if doc.get("kind") == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"cluster/{rel}: Service must be ClusterIP"
        for path, k, v in walk(doc):
            if k == "serviceType":
                assert v == "ClusterIP", f"cluster/{rel}: {'.'.join(map(str, path))}.serviceType={v}"
    for rel in AUTOSCALER:
        cfg = load(rel)
        assert "0.0.0.0/0" not in json.dumps(cfg), f"cluster/{rel}: opens something to 0.0.0.0/0"
        for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
            assert not re.search(r"--dashboard-host[= ](0\.0\.0\.0|::)", cmd), \
                f"cluster/{rel}: the dashboard must not listen on public interfaces"


# ---------------------------------------------------------------- autoscaler configs

@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), "the installed Ray ships its cluster-config schema here"
    return json.loads(path.read_text())


@pytest.mark.parametrize("rel", AUTOSCALER)
def test_autoscaler_config_validates_against_ray(rel, ray_schema):
    """The offline part of `ray up`: Ray's JSON schema, then Ray's own config preparation."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(rel)
    jsonschema.validate(cfg, ray_schema)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("rel", AUTOSCALER)
def test_autoscaler_config_shape(rel):
    cfg = load(rel)
    provider = cfg["provider"]
    assert cfg["cluster_name"]
    assert provider["type"] == rel.split(".")[0]
    assert provider["region"]
    if provider["type"] == "gcp":
        assert provider["project_id"] and provider["availability_zone"]
    assert cfg["max_workers"] >= 1 and cfg["idle_timeout_minutes"] > 0

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), \
        "the head coordinates only: no trial may be scheduled on it"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu_workers = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"cluster/{rel}: no GPU worker type"
    assert any(v["resources"]["GPU"] >= 4 for v in gpu_workers.values()), "a multi-GPU worker type"
    for name, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, f"{name}: must scale from zero"
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: advertises no CPUs"
        itype = t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
        if itype in GPUS:
            assert t["resources"].get("GPU") == GPUS[itype], f"{name}: {itype} has {GPUS[itype]} GPUs"

    # Ray, Python and the image agree with the pinned set.
    images = [v for k, v in cfg["docker"].items() if k.endswith("image")]
    assert images and all(f":{_ray_version()}-py311" in i for i in images), images
    assert any(i.endswith("-gpu") for i in images)

    # kdray is installed on every node, from the synced sources (or a git URL).
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert any(re.search(r"-e\s+~/kdray\b|kdray @ git\+", c) for c in installs), cfg["setup_commands"]
    mounts = cfg["file_mounts"]
    assert mounts.get("~/kdray/pyproject.toml") == "./pyproject.toml"
    assert mounts.get("~/kdray/kdray") == "./kdray"
    for local in mounts.values():
        assert (ROOT / local).exists(), f"file_mounts source {local} does not exist"
    for pattern in cfg.get("rsync_exclude", []):
        assert pattern.strip("/") not in ("data", "kdray"), \
            f"rsync_exclude {pattern!r} would drop the kdray/data package"

    start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "--dashboard-host=127.0.0.1" in start
    assert "$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])


def test_aws_ssh_only_from_own_security_group():
    """Ray's auto-created group opens SSH to 0.0.0.0/0; every node type names the user's own."""
    cfg = load("aws.yaml")
    for name, t in cfg["available_node_types"].items():
        sgs = t["node_config"].get("SecurityGroupIds")
        assert sgs and all(s.startswith("sg-") for s in sgs), f"{name}: SecurityGroupIds missing"
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r.get("CidrIp") != "0.0.0.0/0" for r in rule.get("IpRanges", []))
    for name, t in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert "IamInstanceProfile" in t["node_config"], f"{name}: no identity for s3:// storage"


def test_gcp_gpu_nodes_and_network():
    cfg = load("gcp.yaml")
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        # Off the default network (whose default-allow-ssh is open to the world).
        assert nc["networkInterfaces"][0]["subnetwork"].endswith("/subnetworks/kdray-ray"), name
        assert "kdray-ray" in nc["tags"]["items"], name
        if t["resources"].get("GPU"):
            # An object, as the Compute API wants (Ray's own examples use a list).
            assert isinstance(nc["scheduling"], dict), f"{name}: scheduling must be an object"
            assert nc["scheduling"].get("onHostMaintenance") == "TERMINATE", name
            if nc["machineType"].startswith("n1-"):
                acc = nc["guestAccelerators"]
                assert sum(a["acceleratorCount"] for a in acc) == t["resources"]["GPU"], name
            assert {"key": "install-nvidia-driver", "value": "True"} in nc["metadata"]["items"], name


# ---------------------------------------------------------------- KubeRay

def _cluster_spec_checks(rel: str, spec: dict) -> None:
    assert spec["rayVersion"] == _ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_c = containers(head["template"])[0]
    assert not head_c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    env = env_of(head_c)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert from_secret(env, name), f"cluster/{rel}: {name} must come from a Secret"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if int(containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, f"cluster/{rel}: no GPU worker group"
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g.get("replicas", 0) == 0
    for g in gpu_groups:
        res = containers(g["template"])[0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    images = {c["image"] for grp in [head] + groups for c in containers(grp["template"])}
    assert all(f"ray{_ray_version()}-py311" in i for i in images), images


def test_raycluster():
    docs = {d["kind"]: d for d in load_all("kuberay/raycluster.yaml")}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    _cluster_spec_checks("kuberay/raycluster.yaml", rc["spec"])
    assert docs["ServiceAccount"]["metadata"]["name"] == \
        rc["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]


def test_rayjob():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["kdray", "sweep"]
    sweep = argv[2]
    assert sweep.startswith("/home/ray/kdray/") and (ROOT / sweep.removeprefix("/home/ray/kdray/")).is_file(), \
        f"the entrypoint's sweep file {sweep} is not in the image"
    storage = argv[argv.index("--storage") + 1]
    assert storage.startswith(("s3://", "gs://")), "a cluster needs shared storage"
    assert spec["shutdownAfterJobFinishes"] is True
    _cluster_spec_checks("kuberay/rayjob.yaml", spec["rayClusterSpec"])


# ---------------------------------------------------------------- MLflow

def test_mlflow_server_manifests():
    docs = {d["kind"]: d for d in load_all("mlflow/mlflow.yaml")}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    pod = docs["Deployment"]["spec"]["template"]
    c = containers(pod)[0]
    env = env_of(c)
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert from_secret(env, name), f"{name} must come from a secretKeyRef"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith(("s3://", "gs://"))
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # The container runs run-server.sh, which the image installs under that name.
    dockerfile = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert c["command"] == ["kdray-mlflow-server"] and "COPY run-server.sh /usr/local/bin/kdray-mlflow-server" in dockerfile
    from importlib.metadata import version
    assert f'"mlflow[auth]=={version("mlflow")}"' in dockerfile and "psycopg2" in dockerfile
    script = (CLUSTER / "mlflow" / "run-server.sh").read_text()
    for flag in ("--app-name basic-auth", "--serve-artifacts", "--artifacts-destination"):
        assert flag in script

    pg = {d["kind"]: d for d in load_all("mlflow/postgres.yaml")}
    assert from_secret(env_of(containers(pg["StatefulSet"]["spec"]["template"])[0]), "POSTGRES_PASSWORD")
    assert pg["Service"]["spec"]["type"] == "ClusterIP"
    assert set(load("mlflow/kustomization.yaml")["resources"]) == {"postgres.yaml", "mlflow.yaml"}


def test_run_server_script(tmp_path):
    """run-server.sh on a VM: loopback, basic-auth, secrets in mode-600 files, none on the command line."""
    script = CLUSTER / "mlflow" / "run-server.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.access(script, os.X_OK)
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir(), home.mkdir()
    stub = bin_dir / "mlflow"        # records what the real server would be started with
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv"\n'
                    'cp "$MLFLOW_AUTH_CONFIG_PATH" "$HOME/ini"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               MLFLOW_AUTH_DATABASE_URI="postgresql+psycopg2://mlflow:p%40ss@db:5432/mlflow_auth")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    argv = (home / "argv").read_text().split("\n")
    assert argv[:3] == ["server", "--app-name", "basic-auth"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--serve-artifacts" in argv and "--artifacts-destination" in argv
    state = home / ".kdray-mlflow"
    secrets = dict(line.split("=", 1) for line in (state / "secrets.env").read_text().split())
    assert len(secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 24
    assert not any(v in " ".join(argv) for v in secrets.values()), "a secret on the command line"
    for f in ("secrets.env", "basic_auth.ini"):
        assert (state / f).stat().st_mode & 0o077 == 0, f"{f} is readable by others"
    import configparser
    ini = configparser.ConfigParser()
    ini.read(home / "ini")
    assert ini["mlflow"]["database_uri"] == env["MLFLOW_AUTH_DATABASE_URI"]  # "%" survives interpolation


# ---------------------------------------------------------------- README

def test_readme_submission_commands():
    """The documented `ray job submit` works: its excludes keep the package and drop the bulk."""
    from ray._private.thirdparty.pathspec import PathSpec

    readme = (CLUSTER / "README.md").read_text()
    for needle in ("ray job submit --address http://127.0.0.1:8265 --working-dir .", "ray dashboard",
                   ".rayignore", "MLFLOW_TRACKING_URI", "kdray report", "512 MiB", "--storage s3://"):
        assert needle in readme, f"cluster/README.md does not mention {needle!r}"
    texts = [readme] + [(CLUSTER / rel).read_text() for rel in all_yaml()]
    envs = [json.loads(m) for t in texts for m in re.findall(r"--runtime-env-json '([^']+)'", t)]
    assert envs
    for renv in envs:
        spec = PathSpec.from_lines("gitwildmatch", renv["excludes"])
        for kept in ("kdray/data/__init__.py", "kdray/__init__.py", "search_spaces/quickstart.yaml", "pyproject.toml"):
            assert not spec.match_file(kept), f"excludes {renv['excludes']} drop {kept}"
        for dropped in (".git/HEAD", "results/x/mlflow.db", ".venv/bin/python", "data/tinyshakespeare/input.txt"):
            assert spec.match_file(dropped), f"excludes {renv['excludes']} keep {dropped}"
