// istio-iptables as Istio ships it (the pilot-agent subcommand), built from the
// Go module proxy for halfclose's generator tests.  Only a main: the rule code
// is Istio's own, imported by version in go.mod.
package main

import (
	"os"

	"istio.io/istio/pkg/log"
	iptcmd "istio.io/istio/tools/istio-iptables/pkg/cmd"
)

func main() {
	if err := iptcmd.GetCommand(log.DefaultOptions()).Execute(); err != nil {
		os.Exit(1)
	}
}
