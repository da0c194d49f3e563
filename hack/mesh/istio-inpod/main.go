// Istio ambient's in-pod rules as istio-cni's node agent writes them into an
// app pod's netns (cni/pkg/iptables, cni/pkg/nftables), built from the Go
// module proxy for halfclose's generator tests.  Run it inside the target netns
// (ip netns exec): istio-cni's "host" netns defaults to the process's own.
//
//	istio-inpod [-backend iptables-nft|iptables-legacy|nft] [-ipv6] [-dns=false]
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"

	"istio.io/istio/cni/pkg/config"
	"istio.io/istio/cni/pkg/iptables"
	"istio.io/istio/cni/pkg/nftables"
	"istio.io/istio/cni/pkg/scopes"
	dep "istio.io/istio/tools/istio-iptables/pkg/dependencies"
)

func main() {
	backend := flag.String("backend", "iptables-nft", "iptables-nft, iptables-legacy or nft")
	ipv6 := flag.Bool("ipv6", false, "also write the IPv6 rules (ENABLE_INBOUND_IPV6)")
	dns := flag.Bool("dns", true, "redirect DNS to ztunnel (REDIRECT_DNS)")
	flag.Parse()

	cfg := &config.AmbientConfig{
		EnableIPv6:             *ipv6,
		RedirectDNS:            *dns,
		HostProbeSNATAddress:   netip.MustParseAddr("169.254.7.127"),
		HostProbeV6SNATAddress: netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
	}
	var err error
	switch *backend {
	case "nft":
		var pod *nftables.NftablesConfigurator
		_, pod, err = nftables.NewNftablesConfigurator(cfg, cfg, nil, nil, iptables.RealNlDeps())
		if err == nil {
			err = pod.CreateInpodRules(scopes.CNIAgent, config.PodLevelOverrides{})
		}
	case "iptables-nft", "iptables-legacy":
		force := map[string]string{"iptables-nft": "nft", "iptables-legacy": "legacy"}[*backend]
		deps := &dep.RealDependencies{ForceIptablesBinary: force}
		var pod *iptables.IptablesConfigurator
		_, pod, err = iptables.NewIptablesConfigurator(cfg, cfg, deps, deps, iptables.RealNlDeps())
		if err == nil {
			err = pod.CreateInpodRules(scopes.CNIAgent, config.PodLevelOverrides{})
		}
	default:
		err = fmt.Errorf("unknown backend %q", *backend)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "istio-inpod:", err)
		os.Exit(1)
	}
}
