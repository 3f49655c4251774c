"""fedyolo on AWS: ``fedyolo deploy aws plan|up|status|scale|down`` (``deploy.aws.stack``).

A SuperLink and the ServerApp on EC2 in an Auto Scaling group of one, the clients in an EC2
Auto Scaling group, TLS material and node keys in SSM Parameter Store, metrics and alarms in
CloudWatch, the server's state in S3. Every resource carries the tag
``fedyolo:deployment=<name>``; ``down`` removes what carries it and then checks that nothing
does. boto3 only; the tests run against moto's HTTP server on 127.0.0.1.
"""

from deploy import DeployError

TAG = "fedyolo:deployment"


class AwsError(DeployError):
    """An AWS step that failed or cannot start; the message names the resource and why."""
