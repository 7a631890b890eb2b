/**
 * Socket errors in the words a user reads: what went wrong dialing or
 * listening, as a stable reason (for detail.reason) and a short phrase (for
 * the message). Shared by the transports so every one reports alike.
 */

export type DialFailure = 'refused' | 'timeout' | 'dns' | 'unreachable' | 'reset' | 'error';

/** The errno behind an error, looking inside the AggregateError Happy Eyeballs throws. */
export function errnoOf(err: NodeJS.ErrnoException): string | undefined {
  return err.code ?? (err instanceof AggregateError ? (err.errors[0] as NodeJS.ErrnoException | undefined)?.code : undefined);
}

/** For "cannot reach the server at X: <text>". Unknown errors keep their own message. */
export function describeDialError(err: NodeJS.ErrnoException, host: string): { reason: DialFailure; text: string } {
  switch (errnoOf(err)) {
    case 'ECONNREFUSED':
      return { reason: 'refused', text: 'connection refused' };
    case 'ETIMEDOUT':
      return { reason: 'timeout', text: 'timed out' };
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'EAI_FAIL':
    case 'EAI_NODATA':
      return { reason: 'dns', text: `cannot resolve the name ${host}` };
    case 'EHOSTUNREACH':
      return { reason: 'unreachable', text: 'host unreachable' };
    case 'ENETUNREACH':
      return { reason: 'unreachable', text: 'network unreachable' };
    case 'ECONNRESET':
      return { reason: 'reset', text: 'connection reset' };
    default:
      return { reason: 'error', text: err.message };
  }
}

/** For "cannot listen on X: <text>". */
export function describeListenError(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'EADDRINUSE':
      return 'address already in use';
    case 'EACCES':
      return 'permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)';
    case 'EADDRNOTAVAIL':
      return 'address not available (no interface on this machine has it)';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'cannot resolve the host name';
    default:
      return err.message;
  }
}

/** The error a dial rejects with when its signal aborts. */
export function abortError(signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new DOMException('the dial was aborted', 'AbortError');
}
