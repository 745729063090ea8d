"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, a free port.

``moto_s3(auth=True)`` starts ``python -m moto.server -H 127.0.0.1 -p 0`` (the port is the
one it reports), and with ``auth`` makes it check credentials as S3 does: moto enforces IAM
after its first ``INITIAL_NO_AUTH_ACTION_COUNT`` requests, which create two IAM users with
access keys: one with an allow-all S3 policy, one that may only list and read.  Requests
signed with any other key, or the right key and a wrong secret, are then refused, and the
reader's writes are denied.  The server is stopped by its pid.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from procs import terminate

REGION = "us-east-1"
_IAM_SETUP_REQUESTS = 6    # create_user, create_access_key, put_user_policy; for each of two users
# moto names some S3 actions after the API call (s3:ListObjectsV2, s3:HeadBucket) where AWS uses
# s3:ListBucket: the wildcards cover both.
POLICIES = {"kdray": ["s3:*"], "reader": ["s3:List*", "s3:Get*", "s3:HeadBucket"]}


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    reader: tuple[str, str] = ("", "")     # (key id, secret) of the user who may only list and read

    def env(self) -> dict[str, str]:
        """The variables a user sets for an S3-compatible server (docs/distributed.md)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}

    def client(self, key_id: str | None = None, secret: str | None = None):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under the prefix (all pages)."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


@contextmanager
def moto_s3(auth: bool = True):
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_IAM_SETUP_REQUESTS if auth else "inf")}
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        endpoint = None
        for line in proc.stdout:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                endpoint = m.group(1)
                break
        if endpoint is None:
            raise RuntimeError(f"moto server exited with {proc.wait()} before listening")
        # Keep reading its request log, or the pipe fills and the server blocks.
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        server = S3Server(endpoint, "testing", "testing")
        if auth:
            import boto3
            iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                               aws_access_key_id="setup", aws_secret_access_key="setup")
            keys = {}
            for user, actions in POLICIES.items():
                iam.create_user(UserName=user)
                key = iam.create_access_key(UserName=user)["AccessKey"]
                iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
                keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
            server = S3Server(endpoint, *keys["kdray"], reader=keys["reader"])
        yield server
    finally:
        terminate(proc)
