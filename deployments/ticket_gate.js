// The ticket proxy's gate (nginx njs, `js_content`): what the ticket credential may do at the
// Prefect API. deployments/ticket_proxy.py prepends POLICY (the deployments a ticket may start,
// their parameter names and pinned cluster) and CREDENTIAL (the ticket user, a salt and the
// salted SHA-256 of its password), and nginx forwards what passes to `@prefect`, which adds the
// admin auth string. Everything else is refused here, with a JSON `detail` naming the reason.

var crypto = require('crypto');

var UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
// The fields of a run a ticket may set; the rest (job_variables, state, work_queue_name,
// enforce_parameter_schema, context, ...) stay the deployment's.
var RUN_FIELDS = ['parameters', 'tags', 'idempotency_key'];
var TICKET_TAG = /^ticket:[A-Za-z0-9][A-Za-z0-9._:#\/-]{0,127}$/;
var WHAT_IS_ALLOWED = 'the ticket credential may only find a deployment (GET /api/deployments/name/<flow>/<name>), ' +
    'start a run of one (POST /api/deployments/<id>/create_flow_run) and read runs and artifacts ' +
    '(GET /api/flow_runs/<id>, POST /api/flow_runs/filter, POST /api/artifacts/filter); see deployments/TICKETS.md';

function has(object, key) {
    return Object.prototype.hasOwnProperty.call(object, key);
}

function isObject(value) {
    return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function authenticated(r) {
    var m = /^Basic ([A-Za-z0-9+\/=]{1,512})$/.exec(r.headersIn.Authorization || '');
    if (!m) {
        return false;
    }
    var decoded = Buffer.from(m[1], 'base64').toString();
    var colon = decoded.indexOf(':');
    if (colon < 1) {
        return false;
    }
    var digest = crypto.createHash('sha256').update(CREDENTIAL.salt + ':' + decoded.slice(colon + 1)).digest('hex');
    return decoded.slice(0, colon) === CREDENTIAL.user && digest === CREDENTIAL.sha256;
}

function parseObject(text, what) {
    var value;
    try {
        value = JSON.parse(text);
    } catch (e) {
        return {refused: [400, what + ' is not JSON: ' + e.message]};
    }
    if (!isObject(value)) {
        return {refused: [422, what + ' must be a JSON object']};
    }
    return {value: value};
}

function checkRun(deployment, text) {
    if (text === undefined || text === '') {
        return [422, 'the body must be a JSON object: {"parameters": {...}, "tags": ["ticket:<id>"], "idempotency_key": "<id>"}'];
    }
    var parsed = parseObject(text, 'the body');
    if (parsed.refused) {
        return parsed.refused;
    }
    var body = parsed.value;
    var fields = Object.keys(body);
    for (var i = 0; i < fields.length; i++) {
        if (RUN_FIELDS.indexOf(fields[i]) < 0) {
            return [403, 'field ' + JSON.stringify(fields[i]) + ' may not be set with the ticket credential; a run takes ' +
                RUN_FIELDS.join(', ')];
        }
    }
    var parameters = has(body, 'parameters') ? body.parameters : {};
    if (!isObject(parameters)) {
        return [422, 'parameters must be a JSON object'];
    }
    var unknown = Object.keys(parameters).filter(function (name) {
        return deployment.parameters.indexOf(name) < 0;
    }).sort();
    if (unknown.length) {
        return [422, deployment.name + ' has no parameter(s) ' + unknown.join(', ') + '; it takes ' +
            deployment.parameters.join(', ')];
    }
    if (has(parameters, 'cluster') && parameters.cluster !== deployment.cluster) {
        return [403, 'parameters.cluster: ' + JSON.stringify(parameters.cluster) + ' is refused: ' + deployment.name +
            ' runs on cluster ' + JSON.stringify(deployment.cluster) + ' only (leave cluster out, or use the ' +
            'deployment of the other cluster)'];
    }
    if (has(body, 'tags')) {
        if (!Array.isArray(body.tags)) {
            return [422, 'tags must be a list of "ticket:<id>" strings'];
        }
        for (var t = 0; t < body.tags.length; t++) {
            if (typeof body.tags[t] !== 'string' || !TICKET_TAG.test(body.tags[t])) {
                return [422, 'tags: ' + JSON.stringify(body.tags[t]) + ' is not a "ticket:<id>" tag (letters, digits, ' +
                    '._:#/- after "ticket:", at most 128)'];
            }
        }
    }
    if (has(body, 'idempotency_key')) {
        var key = body.idempotency_key;
        if (typeof key !== 'string' || key.length < 1 || key.length > 255) {
            return [422, 'idempotency_key must be a string of 1 to 255 characters'];
        }
    }
    return null;
}

function decide(method, uri, text) {
    var m;
    if (uri === '/api/flow_runs/filter' || uri === '/api/artifacts/filter') {
        if (method !== 'POST') {
            return [403, method + ' ' + uri + ': ' + WHAT_IS_ALLOWED];
        }
        if (text === undefined || text === '') {
            return null;
        }
        var parsed = parseObject(text, 'the filter');
        return parsed.refused || null;
    }
    m = /^\/api\/flow_runs\/([^\/]+)$/.exec(uri);
    if (m && UUID.test(m[1])) {
        return method === 'GET' ? null : [403, method + ' ' + uri + ': ' + WHAT_IS_ALLOWED];
    }
    m = /^\/api\/deployments\/name\/([^\/]+)\/([^\/]+)$/.exec(uri);
    if (m) {
        var name = m[1] + '/' + m[2];
        if (method !== 'GET') {
            return [403, method + ' ' + uri + ': ' + WHAT_IS_ALLOWED];
        }
        if (!has(POLICY.names, name)) {
            return [403, 'deployment ' + name + ' is not open to tickets; these are: ' +
                Object.keys(POLICY.names).sort().join(', ')];
        }
        return null;
    }
    m = /^\/api\/deployments\/([^\/]+)\/create_flow_run$/.exec(uri);
    if (m) {
        if (method !== 'POST') {
            return [403, method + ' ' + uri + ': ' + WHAT_IS_ALLOWED];
        }
        if (!has(POLICY.deployments, m[1])) {
            return [403, 'deployment ' + m[1] + ' is not open to tickets (find its id with GET ' +
                '/api/deployments/name/<flow>/<name>)'];
        }
        return checkRun(POLICY.deployments[m[1]], text);
    }
    return [403, method + ' ' + uri + ': ' + WHAT_IS_ALLOWED];
}

function reply(r, status, detail) {
    r.headersOut['Content-Type'] = 'application/json';
    if (status === 401) {
        r.headersOut['WWW-Authenticate'] = 'Basic realm="bouwsteen tickets"';
    } else {
        r.warn('ticket proxy refused ' + r.method + ' ' + r.variables.request_uri + ': ' + status + ' ' + detail);
    }
    r.return(status, JSON.stringify({detail: detail}));
}

function handle(r) {
    if (r.variables.request_uri === '/api/health' && r.method === 'GET') {
        r.internalRedirect('@prefect');
        return;
    }
    if (!authenticated(r)) {
        reply(r, 401, 'Unauthorized: this entry takes the ticket credential (HTTP Basic)');
        return;
    }
    // What nginx matched (r.uri: decoded, dot segments and double slashes resolved) must be what
    // Prefect receives (the request line as sent): only plain paths, no query string.
    if (r.variables.request_uri !== r.uri) {
        reply(r, 403, 'the path must be plain: no query string, percent-escapes, dot segments or double slashes');
        return;
    }
    if (r.uri === '/bouwsteen/allow-list' && r.method === 'GET') {
        r.headersOut['Content-Type'] = 'application/json';
        r.return(200, JSON.stringify(POLICY));
        return;
    }
    if (r.method !== 'GET' && r.method !== 'POST') {
        reply(r, 403, r.method + ' ' + r.uri + ': ' + WHAT_IS_ALLOWED);
        return;
    }
    if (r.requestText === undefined && Number(r.headersIn['Content-Length'] || 0) > 0) {
        reply(r, 413, 'the body is too large for this entry');
        return;
    }
    var verdict = decide(r.method, r.uri, r.requestText);
    if (verdict) {
        reply(r, verdict[0], verdict[1]);
        return;
    }
    r.internalRedirect('@prefect');
}

export default {handle};
