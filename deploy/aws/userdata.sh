#!/bin/bash
# fedyolo on EC2: the boot script of a __ROLE__ instance of deployment __NAME__, rendered by
# deploy/aws/userdata.py. No secret is in this script: TLS material and keys come from SSM
# Parameter Store through the instance role, at boot.
set -euo pipefail

DEPLOYMENT="__NAME__"
REGION="__REGION__"
ROLE="__ROLE__"
IMAGE="__IMAGE__"
SERVER_IP="__SERVER_IP__"
INTERFACE="__INTERFACE__"
FLEET_PORT="__FLEET_PORT__"
SLOTS="__SLOTS__"
DATA_PATH="__DATA_PATH__"
# the server's run directory after every round (deploy/aws/s3state.py); resume=s3://... reads it
STATE_URL="__STATE_URL__"
LOG_GROUP="/fedyolo/${DEPLOYMENT}"
SECRETS=/etc/fedyolo/secrets

dnf install -y docker
systemctl enable --now docker

TOKEN="$(curl -sS -X PUT http://169.254.169.254/latest/api/token \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
INSTANCE_ID="$(curl -sS -H "X-aws-ec2-metadata-token: ${TOKEN}" \
  http://169.254.169.254/latest/meta-data/instance-id)"

install -d -m 0700 "${SECRETS}"
# this role's parameters: its instance role reads /fedyolo/<name>/<role>/ and nothing else
param() {
  aws ssm get-parameter --region "${REGION}" --with-decryption \
    --name "/fedyolo/${DEPLOYMENT}/${ROLE}/$1" --query Parameter.Value --output text
}
param tls/ca.crt > "${SECRETS}/ca.crt"

aws ecr get-login-password --region "${REGION}" |
  docker login --username AWS --password-stdin "${IMAGE%%/*}"
docker pull "${IMAGE}"

LOGS=(--log-driver awslogs --log-opt "awslogs-region=${REGION}"
  --log-opt "awslogs-group=${LOG_GROUP}" --log-opt "awslogs-stream=${ROLE}-${INSTANCE_ID}")

if [ "${ROLE}" = server ]; then
  # the SuperLink's fixed address: a replacement instance takes over the same interface
  aws ec2 attach-network-interface --region "${REGION}" --device-index 1 \
    --network-interface-id "${INTERFACE}" --instance-id "${INSTANCE_ID}" || true
  param tls/superlink.crt > "${SECRETS}/superlink.crt"
  param tls/superlink.key > "${SECRETS}/superlink.key"
  chmod 0400 "${SECRETS}/superlink.key"
  install -d -m 0700 /var/lib/fedyolo/state
  # Flower 1.41 serves Fleet and Control on this one port (no separate control port)
  docker run -d --name superlink --restart unless-stopped "${LOGS[@]}" \
    -p "${FLEET_PORT}:9092" \
    -e FLWR_TELEMETRY_ENABLED=0 -e FEDYOLO_AWS_DEPLOYMENT="${DEPLOYMENT}" \
    -e AWS_REGION="${REGION}" \
    -e FEDYOLO_STATE_URL="${STATE_URL}" \
    -e FEDYOLO_STATE_KEY_PARAMETER="/fedyolo/${DEPLOYMENT}/server/state/key" \
    -v "${SECRETS}/ca.crt:/secrets/ca.crt:ro" \
    -v "${SECRETS}/superlink.crt:/secrets/superlink.crt:ro" \
    -v "${SECRETS}/superlink.key:/secrets/superlink.key:ro" \
    -v /var/lib/fedyolo/state:/state \
    "${IMAGE}" \
__SERVER_ARGS__
  # node authentication: every client slot's public key may join
  install -d -m 0700 /var/lib/fedyolo/keys
  for i in $(seq 0 $((SLOTS - 1))); do
    param "clients/${i}/pub" > "/var/lib/fedyolo/keys/${i}.pub"
  done
else
  # a key slot of its own: the first claim parameter this instance creates (never overwrites)
  SLOT=""
  for i in $(seq 0 $((SLOTS - 1))); do
    if aws ssm put-parameter --region "${REGION}" --type String --value "${INSTANCE_ID}" \
      --name "/fedyolo/${DEPLOYMENT}/client/claims/${i}" > /dev/null 2>&1; then
      SLOT="${i}"
      break
    fi
  done
  if [ -z "${SLOT}" ]; then
    echo "fedyolo: no free client key slot of ${SLOTS} (claims under /fedyolo/${DEPLOYMENT}/client/claims/)" >&2
    exit 1
  fi
  # a graceful stop (scale-in, spot interruption) gives the slot back
  cat > /etc/systemd/system/fedyolo-release-slot.service <<UNIT
[Unit]
Description=fedyolo: release client key slot ${SLOT}
After=network-online.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/usr/bin/aws ssm delete-parameter --region ${REGION} --name /fedyolo/${DEPLOYMENT}/client/claims/${SLOT}
[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now fedyolo-release-slot.service
  param "slots/${SLOT}/key" > "${SECRETS}/node.key"
  chmod 0400 "${SECRETS}/node.key"
  PARTITION_ID="${SLOT}"
  docker run -d --name supernode --restart on-failure "${LOGS[@]}" \
    -e FLWR_TELEMETRY_ENABLED=0 -e OMP_NUM_THREADS="$(nproc)" \
    -e FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    -v "${SECRETS}/ca.crt:/secrets/ca.crt:ro" \
    -v "${SECRETS}/node.key:/secrets/node.key:ro" \
    -v "${DATA_PATH}:/data:ro" \
    "${IMAGE}" \
__CLIENT_ARGS__
fi
