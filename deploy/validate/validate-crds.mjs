// Validate custom resources against schemas generated from their CRDs
// (@kubernetes-models/*, from the npm registry; nothing is fetched at run time).
// Reads a JSON array of manifests on stdin; prints one line per manifest; exit 1 if any fails.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};
let failed = false;
for (const manifest of JSON.parse(readFileSync(0, "utf8"))) {
  const key = `${manifest.apiVersion}/${manifest.kind}`;
  const Model = models[key];
  if (!Model) {
    console.log(`${key}: no schema here`);
    failed = true;
    continue;
  }
  try {
    new Model(manifest).validate();
    console.log(`${key} ${manifest.metadata.name}: valid`);
  } catch (error) {
    console.log(`${key} ${manifest.metadata.name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
