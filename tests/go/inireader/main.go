// The Databricks SDK for Go's own config-file loader (config.LoadFile: gopkg.in/ini.v1 with
// the SDK's options) as the second oracle of the config-file differential
// (tests/ini_configparser.rs): reads every file of a directory and prints one JSON object,
// per file either {"error": "..."} or {"profiles": {name: {key: value}}}, each profile as
// the SDK resolves it (Section(name).KeysHash(): its own keys, as spelled).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/databricks/databricks-sdk-go/config"
)

func main() {
	dir := os.Args[1]
	entries, err := os.ReadDir(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	out := map[string]any{}
	for _, name := range names {
		f, err := config.LoadFile(filepath.Join(dir, name))
		if err != nil {
			out[name] = map[string]string{"error": err.Error()}
			continue
		}
		profiles := map[string]map[string]string{}
		for _, s := range f.Sections() {
			profiles[s.Name()] = s.KeysHash()
		}
		out[name] = map[string]any{"profiles": profiles}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
