"""Write configmap.yaml: the repository's config.yaml with the in-cluster settings.

    python deploy/k8s/configmap.py     (after any change to config.yaml; a test checks they agree)
"""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
text = (HERE.parents[1] / "config.yaml").read_text()
text = text.replace("bootstrap_servers: [127.0.0.1:9092]", "bootstrap_servers: [kafka.kafka.svc:9092]")
text = re.sub(r"(\n  host: )127\.0\.0\.1(\s)", r"\g<1>0.0.0.0\2", text)
text = re.sub(r"(\n  path: )models(\s)", r"\g<1>/models\2", text, count=1)
body = "".join("    " + line + "\n" if line else "\n" for line in text.splitlines())
(HERE / "configmap.yaml").write_text(
    "# config.yaml as shipped, with the in-cluster settings: the Kafka address, metrics on every\n"
    "# interface, the model store on the shared volume. Written by configmap.py.\n"
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stream-forecaster-config\ndata:\n  config.yaml: |\n" + body)
