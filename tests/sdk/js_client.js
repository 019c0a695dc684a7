// The official Databricks SDK for JavaScript (@databricks/sdk-experimental) as a real client of
// pat-rotator, driven by js_client.py (which starts the emulator and the rotator):
// 1. one long-lived WorkspaceClient on the metadata-service endpoint calls currentUser.me()
//    every 250 ms for LONG_S seconds;
// 2. a WorkspaceClient built from the config file for each call, for FILE_S seconds.
// Prints one JSON line: calls and errors of each phase (an error is any failed call).
"use strict";
const {WorkspaceClient, Config} = require("@databricks/sdk-experimental");

const env = process.env;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function phase(seconds, makeClient) {
    const out = {calls: 0, errors: []};
    const end = Date.now() + seconds * 1000;
    while (Date.now() < end) {
        try {
            const me = await makeClient().currentUser.me();
            if (me.userName !== "emulated-user@example.com") {
                out.errors.push(`unexpected user ${me.userName}`);
            }
        } catch (e) {
            out.errors.push(String(e && e.message ? e.message : e).slice(0, 300));
        }
        out.calls += 1;
        await sleep(250);
    }
    return out;
}

async function main() {
    const longLived = new WorkspaceClient(
        new Config({host: env.PAT_JS_HOST, authType: "metadata-service", metadataServiceUrl: env.PAT_JS_METADATA_URL})
    );
    const metadata = await phase(Number(env.PAT_JS_LONG_S), () => longLived);
    const file = await phase(Number(env.PAT_JS_FILE_S), () =>
        new WorkspaceClient(new Config({configFile: env.PAT_JS_CONFIG_FILE, profile: "DEFAULT"}))
    );
    process.stdout.write(JSON.stringify({node: process.version, metadata, file}) + "\n");
}

main().catch((e) => {
    process.stdout.write(JSON.stringify({fatal: String(e)}) + "\n");
    process.exit(1);
});
