# The pre-delete hook of charts/chatq (templates/operator-cleanup-hook.yaml): delete this
# release's QueueScalers and wait until the operator has released them (lifted its finalizer).
import os
import sys
import time

from kubernetes import client, config
from kubernetes.client.rest import ApiException

config.load_config()  # in a pod: its ServiceAccount; elsewhere: KUBECONFIG
api = client.CustomObjectsApi()
where = ("chatq.io", "v1alpha1", os.environ["RELEASE_NAMESPACE"], "queuescalers")
selector = os.environ["RELEASE_SELECTOR"]


def names():
    items = api.list_namespaced_custom_object(*where, label_selector=selector)["items"]
    return [item["metadata"]["name"] for item in items]


for name in names():
    try:
        api.delete_namespaced_custom_object(*where, name)
        print(f"deleting QueueScaler {name}", flush=True)
    except ApiException as exc:
        if exc.status != 404:
            raise
deadline = time.monotonic() + float(os.environ.get("RELEASE_TIMEOUT_SECONDS", "120"))
while left := names():
    if time.monotonic() > deadline:
        sys.exit(f"QueueScalers {left} still have the operator's finalizer: is the operator running?")
    time.sleep(1)
print("the operator released every QueueScaler of the release", flush=True)
