// driver drives a CNI network configuration list the way a container runtime
// does, through libcni (the reference runtime library). The Rust lab tests use
// it to exercise swarmnet's CNI plugin with a real client.
//
// Build (Debian 12, offline, GOPATH mode; needs golang-go and
// golang-github-appc-cni-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o /tmp/cnidriver driver.go
//
// Usage:
//
//	driver add|check|del CONFLIST_FILE NETNS_PATH CONTAINER_ID IFNAME [CAP_ARGS_JSON]
//	driver validate CONFLIST_FILE
//	driver version CONFLIST_FILE
//
// Environment:
//
//	CNI_PATH            colon-separated plugin search path (default /opt/cni/bin:/usr/lib/cni)
//	CNI_CACHE_DIR       libcni result cache directory (default /var/lib/cni)
//	CNI_ARGS_EXTRA      extra CNI_ARGS as "K=V;K=V" (e.g. K8S_POD_NAME=foo)
//	CNI_DRIVER_TIMEOUT  per-invocation timeout as a Go duration (default 120s)
//
// The environment is inherited by the plugins (libcni passes os.Environ() and
// overrides only the CNI_* protocol variables).
//
// Output: add prints the final result, converted to the conflist's cniVersion,
// as JSON on stdout. check and del print nothing. validate prints the
// capabilities libcni found (one per line). version prints the VERSION reply of
// the first plugin of the list as JSON.
//
// Errors go to stderr and the exit status is 1 (2 for usage errors). If the
// error is (or wraps) a CNI error (*types.Error) the first line of stderr is
// "code=<N> msg=<msg>" (newlines in msg escaped as \n), followed by
// "details=<details>" if any, and then "error: <full error text>". Other errors
// are printed as "error: <text>". Note that libcni reports a plugin that exits
// non-zero without a JSON error on stdout as a CNI error with code=0.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

const defaultCNIPath = "/opt/cni/bin:/usr/lib/cni"

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s add|check|del CONFLIST_FILE NETNS_PATH CONTAINER_ID IFNAME [CAP_ARGS_JSON]\n", filepath.Base(os.Args[0]))
	fmt.Fprintf(os.Stderr, "       %s validate|version CONFLIST_FILE\n", filepath.Base(os.Args[0]))
	os.Exit(2)
}

func fail(err error) {
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		msg := strings.ReplaceAll(cniErr.Msg, "\n", `\n`)
		fmt.Fprintf(os.Stderr, "code=%d msg=%s\n", cniErr.Code, msg)
		if cniErr.Details != "" {
			fmt.Fprintf(os.Stderr, "details=%s\n", strings.ReplaceAll(cniErr.Details, "\n", `\n`))
		}
	}
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	os.Exit(1)
}

func pluginPaths() []string {
	raw := os.Getenv("CNI_PATH")
	if raw == "" {
		raw = defaultCNIPath
	}
	var paths []string
	for _, p := range filepath.SplitList(raw) {
		if p != "" {
			paths = append(paths, p)
		}
	}
	return paths
}

// parseArgs parses "K=V;K=V" into CNI_ARGS pairs.
func parseArgs(raw string) ([][2]string, error) {
	var out [][2]string
	for _, kv := range strings.Split(raw, ";") {
		kv = strings.TrimSpace(kv)
		if kv == "" {
			continue
		}
		i := strings.IndexByte(kv, '=')
		if i <= 0 {
			return nil, fmt.Errorf("CNI_ARGS_EXTRA: entry %q is not K=V", kv)
		}
		out = append(out, [2]string{kv[:i], kv[i+1:]})
	}
	return out, nil
}

func main() {
	if len(os.Args) < 3 {
		usage()
	}
	verb, confFile := os.Args[1], os.Args[2]

	list, err := libcni.ConfListFromFile(confFile)
	if err != nil {
		fail(err)
	}

	timeout := 120 * time.Second
	if s := os.Getenv("CNI_DRIVER_TIMEOUT"); s != "" {
		if timeout, err = time.ParseDuration(s); err != nil {
			fail(fmt.Errorf("CNI_DRIVER_TIMEOUT: %w", err))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	cninet := libcni.NewCNIConfigWithCacheDir(pluginPaths(), os.Getenv("CNI_CACHE_DIR"), nil)

	switch verb {
	case "version":
		info, err := cninet.GetVersionInfo(ctx, list.Plugins[0].Network.Type)
		if err != nil {
			fail(err)
		}
		// Encode uses a json.Encoder: the output already ends in a newline.
		if err := info.Encode(os.Stdout); err != nil {
			fail(err)
		}
		return
	case "validate":
		caps, err := cninet.ValidateNetworkList(ctx, list)
		if err != nil {
			fail(err)
		}
		for _, c := range caps {
			fmt.Println(c)
		}
		return
	case "add", "check", "del":
	default:
		usage()
	}

	if len(os.Args) < 6 || len(os.Args) > 7 {
		usage()
	}
	rt := &libcni.RuntimeConf{
		NetNS:       os.Args[3],
		ContainerID: os.Args[4],
		IfName:      os.Args[5],
	}
	if rt.Args, err = parseArgs(os.Getenv("CNI_ARGS_EXTRA")); err != nil {
		fail(err)
	}
	if len(os.Args) == 7 && strings.TrimSpace(os.Args[6]) != "" {
		caps := map[string]interface{}{}
		if err := json.Unmarshal([]byte(os.Args[6]), &caps); err != nil {
			fail(fmt.Errorf("CAP_ARGS_JSON: %w", err))
		}
		rt.CapabilityArgs = caps
	}

	switch verb {
	case "add":
		res, err := cninet.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		if list.CNIVersion != "" {
			if res, err = res.GetAsVersion(list.CNIVersion); err != nil {
				fail(fmt.Errorf("converting result to %s: %w", list.CNIVersion, err))
			}
		}
		if err := res.PrintTo(os.Stdout); err != nil {
			fail(err)
		}
		fmt.Println() // PrintTo writes indented JSON without a final newline
	case "check":
		if err := cninet.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cninet.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	}
}
