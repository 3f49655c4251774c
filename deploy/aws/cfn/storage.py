"""Storage: the state bucket, the two image repositories, the logs group.

The bucket holds the server's state after every round (``deploy.aws.s3state``): versioned,
encrypted, public access blocked, TLS only, and ``DeletionPolicy: Retain``, so deleting the
stack keeps the model and its checkpoints (``fedyolo deploy aws down --delete-state`` empties
and deletes it after the stack). The clients' data goes under ``data/slot-<i>/``, the server's
under ``data/server/`` (each role reads only its prefixes, ``deploy.aws.cfn.iam``).

checkov's findings that are accepted, each with its reason in the resource's ``Metadata``
(``skip``): no KMS customer keys (each costs a monthly fee and a key policy; AWS-owned keys
encrypt the bucket, the repositories and the logs), no access-log bucket for the state bucket.
"""

from __future__ import annotations

import json
from typing import Any

from deploy.aws.cfn import ROLES, att, checkov_skip, name, sub, tags, title

NO_KMS = "AWS-owned encryption; a KMS customer key costs a monthly fee and a key policy"


def bucket_name(cfg: Any) -> dict:
    return sub(f"{name(cfg).lower()}-state-${{AWS::AccountId}}-${{AWS::Region}}")


def bucket(cfg: Any) -> dict:
    return {
        "StateBucket": {
            "Type": "AWS::S3::Bucket",
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Metadata": checkov_skip(
                CKV_AWS_18="access logging needs a second bucket; CloudTrail data events if needed"
            ),
            "Properties": {
                "BucketName": bucket_name(cfg),
                "VersioningConfiguration": {"Status": "Enabled"},
                "BucketEncryption": {
                    "ServerSideEncryptionConfiguration": [
                        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                    ]
                },
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
                "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
                "LifecycleConfiguration": {
                    "Rules": [
                        {  # versions replaced or dropped by the server's sync go after a week
                            "Id": "fedyolo-old-versions",
                            "Status": "Enabled",
                            "NoncurrentVersionExpiration": {"NoncurrentDays": 7},
                            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                        }
                    ]
                },
                "Tags": tags(cfg),
            },
        },
        "StateBucketPolicy": {
            "Type": "AWS::S3::BucketPolicy",
            "Properties": {
                "Bucket": {"Ref": "StateBucket"},
                "PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Sid": "TlsOnly",
                            "Effect": "Deny",
                            "Principal": "*",
                            "Action": "s3:*",
                            "Resource": [
                                att("StateBucket", "Arn"),
                                sub("${StateBucket.Arn}/*"),
                            ],
                            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                        }
                    ],
                },
            },
        },
    }


def lifecycle(keep: int) -> str:
    """ECR lifecycle: untagged images after a day, then at most ``keep`` images (multi-GB each)."""
    return json.dumps(
        {
            "rules": [
                {
                    "rulePriority": 1,
                    "description": "untagged layers of replaced pushes",
                    "selection": {
                        "tagStatus": "untagged",
                        "countType": "sinceImagePushed",
                        "countUnit": "days",
                        "countNumber": 1,
                    },
                    "action": {"type": "expire"},
                },
                {
                    "rulePriority": 2,
                    "description": f"keep the newest {keep} images",
                    "selection": {
                        "tagStatus": "any",
                        "countType": "imageCountMoreThan",
                        "countNumber": keep,
                    },
                    "action": {"type": "expire"},
                },
            ]
        }
    )


def repositories(cfg: Any) -> dict:
    out = {}
    for role in ROLES:
        out[f"{title(role)}Repository"] = {
            "Type": "AWS::ECR::Repository",
            "Metadata": checkov_skip(CKV_AWS_136=NO_KMS),
            "Properties": {
                "RepositoryName": f"{name(cfg).lower()}/{role}",
                "ImageTagMutability": "IMMUTABLE",
                "ImageScanningConfiguration": {"ScanOnPush": True},
                "EncryptionConfiguration": {"EncryptionType": "AES256"},
                "EmptyOnDelete": True,  # images are rebuilt by `fedyolo deploy images`
                "LifecyclePolicy": {"LifecyclePolicyText": lifecycle(int(cfg.ecr.keep_images))},
                "Tags": tags(cfg),
            },
        }
    return out


def log_group(cfg: Any) -> dict:
    return {
        "LogGroup": {
            "Type": "AWS::Logs::LogGroup",
            "Metadata": checkov_skip(CKV_AWS_158=NO_KMS),
            "Properties": {
                "LogGroupName": f"/fedyolo/{name(cfg)}",
                "RetentionInDays": int(cfg.logs.retention_days),
                "Tags": tags(cfg),
            },
        }
    }


def outputs(cfg: Any) -> dict:
    out = {
        "StateBucket": {"Value": {"Ref": "StateBucket"}},
        "LogGroup": {"Value": {"Ref": "LogGroup"}},
    }
    for role in ROLES:
        out[f"{title(role)}RepositoryUri"] = {
            "Value": att(f"{title(role)}Repository", "RepositoryUri")
        }
    return out
