-- A copy written by deploy/router_config.py: edit deploy/haproxy/route_decision.lua.
-- Why the router sent a request where it did (deploy/haproxy/router.cfg.template): sets txn.decision, which
-- the router answers in X-Strata-Route, and counts decisions per server for /router/metrics.
--
--   affinity   the key's last request went to this same server: its KV is here
--   overflow   the key's last server is up but was above the load bound (or a server joined the ring and
--              took the key's place): the next server on the ring took it, its KV comes from the shared tier
--   failover   the key's last server is down: the next one took it
--   home       back to the key's first server after an overflow or a failover
--   new        the key's first request (the router has not seen it, or forgot it)
--   no-key     neither a session header nor a previous response: placed by load alone

local counts = {}  -- counts[server][decision]

local function server_up(backend, puid)
    for _, server in pairs(backend.servers) do
        if tostring(server.puid) == tostring(puid) then
            return server:get_stats()["status"]:sub(1, 2) == "UP"
        end
    end
    return false
end

local function decide(txn)
    if txn:get_var("txn.source") == nil then
        return "no-key"
    end
    local last = txn:get_var("txn.last_server")
    if last == nil or last == 0 then
        return "new"
    end
    local server = txn.f:srv_id()
    if last == server then
        return "affinity"
    end
    if txn:get_var("txn.first_server") == server then
        return "home"
    end
    if server_up(core.backends[txn.f:be_name()], last) then
        return "overflow"
    end
    return "failover"
end

core.register_action("strata_route_decision", {"http-res"}, function(txn)
    local decision = decide(txn)
    txn:set_var("txn.decision", decision)
    local server = txn.f:srv_name() or "none"
    counts[server] = counts[server] or {}
    counts[server][decision] = (counts[server][decision] or 0) + 1
end, 0)

core.register_service("strata_router_metrics", "http", function(applet)
    local lines = {
        "# HELP strata_router_requests_total Requests the router sent, by server and by why it chose it.",
        "# TYPE strata_router_requests_total counter",
    }
    for server, by_decision in pairs(counts) do
        for decision, n in pairs(by_decision) do
            lines[#lines + 1] = string.format('strata_router_requests_total{server="%s",decision="%s"} %d',
                                              server, decision, n)
        end
    end
    local body = table.concat(lines, "\n") .. "\n"
    applet:set_status(200)
    applet:add_header("content-type", "text/plain; version=0.0.4")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end)
