// A client of pat-rotator built on the official Databricks SDK for Go: it calls
// CurrentUser.Me for a while and prints what happened as one JSON line.
//
//	-mode metadata: one long-lived client on the metadata-service endpoint;
//	-mode file: a new client from the config file (profile DEFAULT) for every call.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/databricks/databricks-sdk-go"
	"github.com/databricks/databricks-sdk-go/logger"
)

type result struct {
	Mode       string `json:"mode"`
	Calls      int    `json:"calls"`
	Errors     int    `json:"errors"`
	FirstError string `json:"first_error,omitempty"`
}

func main() {
	mode := flag.String("mode", "metadata", "metadata or file")
	host := flag.String("host", "", "the workspace URL")
	metadataURL := flag.String("metadata-url", "", "the rotator's metadata-service URL")
	configFile := flag.String("config", "", "the rotated config file")
	seconds := flag.Int("seconds", 20, "how long to call")
	flag.Parse()
	logger.DefaultLogger = &logger.SimpleLogger{Level: logger.LevelError}

	ctx := context.Background()
	newClient := func() (*databricks.WorkspaceClient, error) {
		if *mode == "metadata" {
			return databricks.NewWorkspaceClient(&databricks.Config{
				Host: *host, AuthType: "metadata-service", MetadataServiceURL: *metadataURL,
			})
		}
		return databricks.NewWorkspaceClient(&databricks.Config{Profile: "DEFAULT", ConfigFile: *configFile})
	}
	r := result{Mode: *mode}
	fail := func(err error) {
		r.Errors++
		if r.FirstError == "" {
			r.FirstError = err.Error()
		}
	}
	longLived, err := newClient()
	if err != nil {
		fail(err)
	}
	deadline := time.Now().Add(time.Duration(*seconds) * time.Second)
	for time.Now().Before(deadline) {
		w := longLived
		if *mode == "file" {
			if w, err = newClient(); err != nil {
				fail(err)
				continue
			}
		}
		r.Calls++
		if me, err := w.CurrentUser.Me(ctx); err != nil {
			fail(err)
		} else if me.UserName != "emulated-user@example.com" {
			fail(fmt.Errorf("unexpected user %q", me.UserName))
		}
		time.Sleep(250 * time.Millisecond)
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
	if r.Errors > 0 {
		os.Exit(1)
	}
}
