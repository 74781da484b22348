// A real OpenID Provider for the tests: node server.mjs PORT KEYS_OUT
// Accounts and their groups come from IDP_ACCOUNTS (JSON: {"alice": {"groups": ["dev"]}}).
// The provider's private signing keys are written to KEYS_OUT so negative tests can forge
// tokens that only fail on the claim under test (expired, wrong audience, ...).
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const keysOut = process.argv[3];
const issuer = `http://127.0.0.1:${port}`;
const resource = process.env.IDP_RESOURCE || 'https://wardgate.test';
const accounts = JSON.parse(process.env.IDP_ACCOUNTS || '{}');
const clientGroups = JSON.parse(process.env.IDP_CLIENT_GROUPS || '{"ci-bot": ["deployers"]}');

function key(type, opts, alg) {
  const { privateKey } = generateKeyPairSync(type, opts);
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg, use: 'sig' };
}
const keys = [key('rsa', { modulusLength: 2048 }, 'RS256'), key('ec', { namedCurve: 'P-256' }, 'ES256')];
writeFileSync(keysOut, JSON.stringify({ keys }), { mode: 0o600 });

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'wardgate-cli',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback', 'http://127.0.0.1/console/callback'],
    },
    {
      client_id: 'ci-bot',
      client_secret: 'ci-bot-secret',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  jwks: { keys },
  scopes: ['openid', 'offline_access', 'profile'],
  claims: { openid: ['sub'], profile: ['name', 'groups'] },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'openid profile offline_access',
        audience: resource,
        accessTokenTTL: 600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  pkce: { required: () => true },
  ttl: { AccessToken: 600, ClientCredentials: 600, DeviceCode: 600, Grant: 3600, Interaction: 600, Session: 3600, RefreshToken: 3600, IdToken: 600 },
  async findAccount(ctx, id) {
    if (!accounts[id]) return undefined;
    return { accountId: id, async claims() { return { sub: id, name: id, groups: accounts[id].groups || [] }; } };
  },
  async extraTokenClaims(ctx, token) {
    if (token.kind === 'ClientCredentials') return { groups: clientGroups[token.clientId] || [] };
    if (token.accountId && accounts[token.accountId]) return { groups: accounts[token.accountId].groups || [], preferred_username: token.accountId };
    return undefined;
  },
  async loadExistingGrant(ctx) {
    // Tests have no consent screen: grant what the client asks for.
    const grant = new provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile offline_access');
    grant.addResourceScope(resource, 'openid profile offline_access');
    await grant.save();
    return grant;
  },
});
provider.proxy = false;
provider.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
