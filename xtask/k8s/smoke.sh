#!/usr/bin/env bash
# Smoke test of the harness's cluster, run through the wrapper other tests use:
#   cargo xtask k8s test -- bash xtask/k8s/smoke.sh
# Checks: a Deployment and a host-network DaemonSet run from the testbox image;
# ping (iputils) and hping3 work inside a pod and busybox's /bin/ping is another
# executable; the container's cgroup is kubepods/.../pod<uid>/<64-hex> in cgroup2;
# both pods reach the apiserver through the `kubernetes` Service (10.96.0.1:443),
# with a TCP connect and with an in-cluster Go client (kubectl with the pod's
# service account, verifying the CA). Traffic goes only to 127.0.0.1 and the Service.
set -uo pipefail
: "${KUBECONFIG:?run me under cargo xtask k8s test}" "${ICMP_GUARD_KUBECTL:?}" "${ICMP_GUARD_CONTAINERD_SOCK:?}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k() { "$ICMP_GUARD_KUBECTL" "$@"; }
ctr() { command ctr --address "$ICMP_GUARD_CONTAINERD_SOCK" -n k8s.io "$@"; }
passed=0 failed=0
check() { # name cmd...
  local name=$1; shift
  local out
  if out=$("$@" 2>&1); then passed=$((passed + 1)); echo "ok   $name"; else
    failed=$((failed + 1)); echo "FAIL $name"; fi
  [ -n "$out" ] && sed 's/^/     /' <<<"$out"
  return 0
}

k apply -f "$here/smoke/nginx.yaml" -f "$here/smoke/hostnet-ds.yaml"
check "nginx Deployment Ready" k wait --for=condition=Available deploy/nginx --timeout=120s
check "probe-ds DaemonSet pod Ready" k wait --for=condition=Ready pod -l app=probe-ds --timeout=120s
k get pods -o wide
P=$(k get pod -l app=nginx -o jsonpath='{.items[0].metadata.name}')
D=$(k get pod -l app=probe-ds -o jsonpath='{.items[0].metadata.name}')

check "iputils ping in $P" k exec "$P" -- /usr/bin/ping -c 1 -W 2 127.0.0.1
check "hping3 in $P" k exec "$P" -- /usr/sbin/hping3 -1 -c 1 127.0.0.1
check "busybox /bin/ping is another executable than /usr/bin/ping" k exec "$P" -- sh -c \
  'set -e; readlink /bin/ping; [ "$(stat -L -c %i /bin/ping)" != "$(stat -c %i /usr/bin/ping)" ]; /bin/ping 2>&1 | head -1 | grep -i busybox'

cgroup_check() {
  local cid pid line uid
  cid=$(k get pod "$P" -o jsonpath='{.status.containerStatuses[0].containerID}'); cid=${cid#containerd://}
  uid=$(k get pod "$P" -o jsonpath='{.metadata.uid}')
  pid=$(ctr tasks ls | awk -v c="$cid" '$1==c {print $2}')
  echo "container $cid pid $pid pod uid $uid"
  grep -E '^0::|:memory:' "/proc/$pid/cgroup"
  line=$(grep '^0::' "/proc/$pid/cgroup"); line=${line#0::}
  [[ $line =~ ^/kubepods/(besteffort/|burstable/)?pod${uid}/${cid}$ ]] || { echo "unexpected path $line"; return 1; }
  [[ $cid =~ ^[0-9a-f]{64}$ ]] || return 1
  test -d "/sys/fs/cgroup/unified$line" && echo "/sys/fs/cgroup/unified$line exists"
}
check "container cgroup is kubepods/.../pod<uid>/<64-hex> in cgroup2" cgroup_check

for pod in "$P" "$D"; do
  check "TCP connect to 10.96.0.1:443 from $pod" k exec "$pod" -- bash -c 'exec 3<>/dev/tcp/10.96.0.1/443 && echo connected'
  k cp "$ICMP_GUARD_KUBECTL" "$pod:/tmp/kubectl" >/dev/null 2>&1
  check "in-cluster Go client (service account, CA verified) from $pod" k exec "$pod" -- sh -c \
    'echo "KUBERNETES_SERVICE_HOST=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"; /tmp/kubectl get --raw /healthz; echo; /tmp/kubectl get --raw /version | grep gitVersion'
done
check "Service endpoint is the harness address, not the node's external one" sh -c \
  "\"\$ICMP_GUARD_KUBECTL\" get endpoints kubernetes -o jsonpath='{.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}' | tee /dev/stderr | grep -qx '10.250.0.1:6443'"

k delete -f "$here/smoke/nginx.yaml" -f "$here/smoke/hostnet-ds.yaml" --wait=false >/dev/null
echo "smoke: $passed passed, $failed failed"
[ "$failed" = 0 ]
