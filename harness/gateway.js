// The gateway's routing by model, run by nginx's own njs module (Debian's libnginx-mod-http-js); nginx.conf is
// written by harness/multinode.py. One address serves every model of the nodes:
//   GET  /v1/models                       every served model, in OpenAI's list shape
//   POST /v1/images/generations|edits     to the model the body names ("model"), OpenAI's error shape otherwise
//   /sdapi/v1/...                         AUTOMATIC1111's API: sd-models lists every model; txt2img/img2img go to
//                                         override_settings.sd_model_checkpoint, else to the model last chosen
//                                         with POST options (kept in a file, as A1111 keeps its choice)
// A request for a model goes to the nodes as /predictions/{model}/1.0/{path} through the internal /_node/
// location, which adds the node's own key and tries the next node when one fails. Clients send the gateway
// key as a Bearer token, or (A1111 clients, like A1111's --api-auth) as the password of HTTP Basic.

var fs = require('fs');

var CHECKPOINT_SUFFIXES = ['.safetensors', '.ckpt'];
var FORWARDED_HEADERS = ['content-type', 'x-seeds', 'x-nsfw', 'x-should-retry'];

function served(r) {
    return r.variables.gateway_models.split(',');
}

function authorized(r) {
    var given = r.headersIn.Authorization || '';
    var key = r.variables.gateway_key;
    if (given === 'Bearer ' + key) {
        return true;
    }
    if (given.slice(0, 6) !== 'Basic ') {
        return false;
    }
    var pair = Buffer.from(given.slice(6).trim(), 'base64').toString();
    var colon = pair.indexOf(':');
    return colon >= 0 && pair.slice(colon + 1) === key;
}

function send(r, status, document) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify(document));
}

// The model's answer, as the node gave it (status, JSON body, the seeds and safety headers).
function forward(r, model, path, done) {
    r.subrequest('/_node/' + model + '/1.0/' + path, {method: r.method, args: r.variables.args || ''},
        function (reply) {
            for (var name in reply.headersOut) {
                if (FORWARDED_HEADERS.indexOf(name.toLowerCase()) >= 0) {
                    r.headersOut[name] = reply.headersOut[name];
                }
            }
            if (done) {
                done(reply.status);
            }
            r.return(reply.status, reply.responseText);
        });
}

// A name as A1111 clients send it: the title, with or without the file suffix.
function modelNamed(models, name) {
    var plain = String(name).trim();
    CHECKPOINT_SUFFIXES.forEach(function (suffix) {
        if (plain.slice(-suffix.length) === suffix) {
            plain = plain.slice(0, -suffix.length);
        }
    });
    return models.indexOf(plain) >= 0 ? plain : null;
}

// --- OpenAI ---------------------------------------------------------------------------------------------------

function openaiError(r, status, message, param, code) {
    send(r, status, {error: {message: message, type: 'invalid_request_error', param: param, code: code}});
}

function openaiModels(r) {
    if (!authorized(r)) {
        return openaiError(r, 401, 'send the gateway key as the API key (Authorization: Bearer KEY)', null,
                           'invalid_api_key');
    }
    var created = Number(r.variables.gateway_started);
    send(r, 200, {object: 'list', data: served(r).map(function (name) {
        return {id: name, object: 'model', created: created, owned_by: 'torchserve'};
    })});
}

// The body's "model": a JSON field, or a multipart form's field (the SDK's edits).
function modelOfBody(r) {
    var text = r.requestText || '';
    if ((r.headersIn['Content-Type'] || '').indexOf('multipart/form-data') === 0) {
        var match = text.match(/name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]*)\r\n/);
        return match ? match[1] : undefined;
    }
    try {
        var body = JSON.parse(text);
        return body && typeof body === 'object' ? body.model : undefined;
    } catch (e) {
        return undefined;  // the node answers the malformed body in OpenAI's shape
    }
}

function openaiImages(r) {
    if (!authorized(r)) {
        return openaiError(r, 401, 'send the gateway key as the API key (Authorization: Bearer KEY)', null,
                           'invalid_api_key');
    }
    var models = served(r);
    var asked = modelOfBody(r);
    if (asked === undefined || asked === null || asked === '') {
        if (models.length !== 1) {
            return openaiError(r, 400, 'model is required here: this gateway serves ' + JSON.stringify(models),
                               'model', 'missing_model');
        }
        asked = models[0];
    }
    if (models.indexOf(asked) < 0) {
        return openaiError(r, 404, 'the model ' + JSON.stringify(String(asked)).slice(0, 80) + ' does not exist ' +
                           'here; this gateway serves ' + JSON.stringify(models), 'model', 'model_not_found');
    }
    forward(r, asked, r.uri.slice(1));
}

// --- AUTOMATIC1111 --------------------------------------------------------------------------------------------

function a1111Error(r, status, kind, message, field) {
    send(r, status, {error: kind, detail: message, body: '', errors: message, field: field});
}

function currentModel(r, models) {
    try {
        var saved = modelNamed(models, fs.readFileSync(r.variables.gateway_state, 'utf8'));
        if (saved) {
            return saved;
        }
    } catch (e) {
        // no choice made yet: the first model
    }
    return models[0];
}

function a1111(r) {
    if (!authorized(r)) {
        r.headersOut['WWW-Authenticate'] = 'Basic';
        return a1111Error(r, 401, 'unauthorized', 'Incorrect username or password: send the gateway key as the ' +
                          'password (HTTP Basic) or as a Bearer token', null);
    }
    var models = served(r);
    var route = r.uri.slice('/sdapi/v1/'.length);
    if (route === 'sd-models') {
        return send(r, 200, models.map(function (name) {
            return {title: name, model_name: name, hash: null, sha256: null, filename: name, config: null};
        }));
    }
    var body = null;
    if (r.requestText) {
        try {
            body = JSON.parse(r.requestText);
        } catch (e) {
            return a1111Error(r, 400, 'invalid_json', 'the body is not valid JSON', null);
        }
    }
    var asked = null;
    var field = null;
    if (body && typeof body === 'object' && route === 'options' && body.sd_model_checkpoint) {
        asked = body.sd_model_checkpoint;
        field = 'sd_model_checkpoint';
    } else if (body && typeof body === 'object' && body.override_settings &&
               typeof body.override_settings === 'object' && body.override_settings.sd_model_checkpoint) {
        asked = body.override_settings.sd_model_checkpoint;
        field = 'override_settings.sd_model_checkpoint';
    }
    var model = asked ? modelNamed(models, asked) : currentModel(r, models);
    if (!model) {
        return a1111Error(r, 404, 'not_found', 'model ' + JSON.stringify(String(asked)).slice(0, 80) +
                          ' not found: this gateway serves ' + JSON.stringify(models), field);
    }
    forward(r, model, 'sdapi/v1/' + route, function (status) {
        if (route === 'options' && asked && status === 200) {
            fs.writeFileSync(r.variables.gateway_state, model);
        }
    });
}

export default {openaiModels: openaiModels, openaiImages: openaiImages, a1111: a1111};
