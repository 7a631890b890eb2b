/**
 * Full-device VPN (TUN mode) end to end over the tcp transport, in network
 * namespaces: curl, ping, iperf3 and DNS from a client namespace with no
 * proxy configured, the kill switch, and the namespaces restored after exit.
 * The tests themselves are in helpers/tun-transport-suite.ts. Needs root,
 * /dev/net/tun, ip, nft, iperf3, ping, curl and dig; skips (exit 77) elsewhere.
 */
import { test } from 'uvu';
import { defineTunTransportTests } from './helpers/tun-transport-suite.ts';

defineTunTransportTests('tcp');
test.run();
