/**
 * definePlugin / defineConfig are identity functions: they exist so that a
 * plugin file or a config file gets type checking and editor completion.
 * `checkPluginDefinition` is what the core runs on whatever a plugin file
 * exports, so a wrong export gives one clear line.
 */
import { DshieldError, ErrorCodes } from './errors.ts';
import type { PluginDefinition, PluginInstanceMap, PluginKind, UserConfig } from './types.ts';

export const PLUGIN_KINDS: readonly PluginKind[] = ['transport', 'cipher', 'auth', 'logger', 'inbound', 'outbound'];

export function definePlugin<K extends PluginKind, O = Record<string, unknown>>(
  def: PluginDefinition<K, O>,
): PluginDefinition<K, O> {
  return def;
}

export function defineConfig(config: UserConfig): UserConfig {
  return config;
}

/** Throws DshieldError(PLUGIN) unless `value` is a plugin definition of `expectedKind`. */
export function checkPluginDefinition<K extends PluginKind>(
  value: unknown,
  expectedKind: K,
  where: string,
): PluginDefinition<K> {
  const fail = (why: string): never => {
    throw new DshieldError(ErrorCodes.PLUGIN, `${where}: ${why}`);
  };
  if (value === null || typeof value !== 'object') {
    fail('the default export must be definePlugin({ kind, name, create })');
  }
  const def = value as Partial<PluginDefinition>;
  if (typeof def.kind !== 'string' || !PLUGIN_KINDS.includes(def.kind as PluginKind)) {
    fail(`"kind" must be one of ${PLUGIN_KINDS.join(', ')}`);
  }
  if (def.kind !== expectedKind) fail(`is a ${def.kind} plugin, but it is used as a ${expectedKind} plugin`);
  if (typeof def.name !== 'string' || def.name === '') fail('"name" must be a non-empty string');
  if (typeof def.create !== 'function') fail('"create" must be a function (options, ctx) => instance');
  if (def.options !== undefined && (typeof def.options !== 'object' || def.options === null)) {
    fail('"options" must be an object describing each option');
  }
  return def as PluginDefinition<K>;
}

export type { PluginInstanceMap };
