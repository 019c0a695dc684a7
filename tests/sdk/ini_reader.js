// The Databricks SDK for JavaScript's own config-file loader (loadConfigFile: the `ini`
// package, flattened as the SDK does) as the third oracle of the config-file differential
// (tests/ini_configparser.rs): reads every file of a directory and prints one JSON object,
// per file either {"error": "..."} or {"profiles": {name: {key: value}}}.
// Usage: node ini_reader.js SDK_NODE_MODULES_DIR DIR
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const {loadConfigFile} = require(path.join(
    process.argv[2], "@databricks/sdk-experimental/dist/config/KnownConfigLoader"));

(async () => {
    const dir = process.argv[3];
    const out = {};
    for (const name of fs.readdirSync(dir).sort()) {
        try {
            const {iniFile} = await loadConfigFile(path.join(dir, name));
            const profiles = {};
            for (const [section, values] of Object.entries(iniFile)) {
                if (values && typeof values === "object") {
                    profiles[section] = Object.fromEntries(
                        Object.entries(values).map(([k, v]) => [k, String(v)]));
                }
            }
            out[name] = {profiles};
        } catch (e) {
            out[name] = {error: String(e && e.message ? e.message : e)};
        }
    }
    process.stdout.write(JSON.stringify(out) + "\n");
})();
