/**
 * The control-plane event bus. It carries state changes only (sessions,
 * streams, errors, counters), never data: the data path calls no listener.
 */
import { EventEmitter } from 'eventemitter3';

export interface DshieldEvents {
  /** A transport listener is accepting links (server) or a proxy is listening (client). */
  listening: (info: { what: string; address: string }) => void;
  /** A secure session completed its handshake. */
  'session:up': (info: { side: 'client' | 'server'; client?: string; remote: string }) => void;
  /** A session ended. Bytes are payload bytes carried by streams and datagrams. */
  'session:down': (info: {
    side: 'client' | 'server';
    client?: string;
    remote: string;
    bytesIn: number;
    bytesOut: number;
    durationMs: number;
    reason?: string;
  }) => void;
  /** A session replaced its keys. */
  'session:rekey': (info: { side: 'client' | 'server'; client?: string }) => void;
  /** A connection failed to authenticate and was silenced (server). */
  'session:refused': (info: { remote: string; reason: string }) => void;
  'stream:open': (info: { id: number; target: string; client?: string }) => void;
  'stream:close': (info: { id: number; target: string; bytesIn: number; bytesOut: number; error?: string }) => void;
  /** The client is (re)connecting; attempt counts from 1. */
  'client:connecting': (info: { attempt: number; server: string }) => void;
  /** The client lost its session and will retry after delayMs. */
  'client:reconnect': (info: { attempt: number; delayMs: number; reason: string }) => void;
  /** The process is shutting down. */
  shutdown: (info: { signal?: string }) => void;
}

export class EventBus extends EventEmitter<DshieldEvents> {}
