using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using OrleansIdempotency.Api.Gateway;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// The gateway (DESIGN §5): src/Api as a YARP reverse proxy, configured by its <c>ReverseProxy</c> section, in
/// front of a backend it knows nothing about, over real Kestrel on both sides.
/// </summary>
public sealed class GatewayTests : IAsyncLifetime
{
    private readonly Backend backend = new();
    private ApiServer gateway = null!;

    public async Task InitializeAsync()
    {
        await backend.StartAsync();
        gateway = await ApiServer.StartAsync(GatewaySettings(backend.Address, policy: GatewayExtensions.DefaultPolicyName));
    }

    public async Task DisposeAsync()
    {
        await gateway.DisposeAsync();
        await backend.StopAsync();
    }

    /// <summary>The embedded default with four routes to <paramref name="backend"/>; <c>/charges</c> uses <paramref name="policy"/>.</summary>
    internal static Dictionary<string, string?> GatewaySettings(Uri backend, string policy) => new(FreePort.SiloEndpoints())
    {
        ["Logging:LogLevel:Default"] = "Error",
        ["ReverseProxy:Clusters:backend:Destinations:one:Address"] = backend.ToString(),
        ["ReverseProxy:Routes:charges:ClusterId"] = "backend",
        ["ReverseProxy:Routes:charges:Match:Path"] = "/charges",
        ["ReverseProxy:Routes:charges:Metadata:Idempotency"] = policy,
        ["ReverseProxy:Routes:strict:ClusterId"] = "backend",
        ["ReverseProxy:Routes:strict:Match:Path"] = "/strict/{**rest}",
        ["ReverseProxy:Routes:strict:Metadata:Idempotency"] = "payments",
        ["ReverseProxy:Routes:keyed:ClusterId"] = "backend",
        ["ReverseProxy:Routes:keyed:Match:Path"] = "/keyed/{**rest}",
        ["ReverseProxy:Routes:keyed:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName,
        ["ReverseProxy:Routes:keyed:Metadata:IdempotencyScopeHeader"] = "X-Api-Key",
        ["ReverseProxy:Routes:plain:ClusterId"] = "backend",
        ["ReverseProxy:Routes:plain:Match:Path"] = "/plain/{**rest}",
        // The same backend, given up on after a second without a byte from it.
        ["ReverseProxy:Clusters:impatient:Destinations:one:Address"] = backend.ToString(),
        ["ReverseProxy:Clusters:impatient:HttpRequest:ActivityTimeout"] = "00:00:01",
        ["ReverseProxy:Routes:impatient:ClusterId"] = "impatient",
        ["ReverseProxy:Routes:impatient:Match:Path"] = "/impatient/{**rest}",
        ["ReverseProxy:Routes:impatient:Metadata:Idempotency"] = "payments",
        // YARP's own request time-out, on a plain route and an idempotent one.
        ["ReverseProxy:Routes:timed:ClusterId"] = "backend",
        ["ReverseProxy:Routes:timed:Match:Path"] = "/timed/{**rest}",
        ["ReverseProxy:Routes:timed:Timeout"] = "00:00:01",
        ["ReverseProxy:Routes:timedCharges:ClusterId"] = "backend",
        ["ReverseProxy:Routes:timedCharges:Match:Path"] = "/timed-charges/{**rest}",
        ["ReverseProxy:Routes:timedCharges:Timeout"] = "00:00:01",
        ["ReverseProxy:Routes:timedCharges:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName,
        // Two pairs of routes with one path, told apart by host and by a header alone.
        ["ReverseProxy:Routes:onA:ClusterId"] = "backend",
        ["ReverseProxy:Routes:onA:Match:Path"] = "/hosted/{**rest}",
        ["ReverseProxy:Routes:onA:Match:Hosts:0"] = "a.example",
        ["ReverseProxy:Routes:onA:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName,
        ["ReverseProxy:Routes:onB:ClusterId"] = "backend",
        ["ReverseProxy:Routes:onB:Match:Path"] = "/hosted/{**rest}",
        ["ReverseProxy:Routes:onB:Match:Hosts:0"] = "b.example",
        ["ReverseProxy:Routes:onB:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName,
        ["ReverseProxy:Routes:v1:ClusterId"] = "backend",
        ["ReverseProxy:Routes:v1:Match:Path"] = "/versioned/{**rest}",
        ["ReverseProxy:Routes:v1:Match:Headers:0:Name"] = "X-Api-Version",
        ["ReverseProxy:Routes:v1:Match:Headers:0:Values:0"] = "v1",
        ["ReverseProxy:Routes:v1:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName,
        ["ReverseProxy:Routes:v2:ClusterId"] = "backend",
        ["ReverseProxy:Routes:v2:Match:Path"] = "/versioned/{**rest}",
        ["ReverseProxy:Routes:v2:Match:Headers:0:Name"] = "X-Api-Version",
        ["ReverseProxy:Routes:v2:Match:Headers:0:Values:0"] = "v2",
        ["ReverseProxy:Routes:v2:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName,
        // A destination nobody listens on.
        ["ReverseProxy:Clusters:down:Destinations:one:Address"] = $"http://127.0.0.1:{FreePort.Next().ToString(CultureInfo.InvariantCulture)}/",
        ["ReverseProxy:Routes:down:ClusterId"] = "down",
        ["ReverseProxy:Routes:down:Match:Path"] = "/down/{**rest}",
        ["ReverseProxy:Routes:down:Metadata:Idempotency"] = "payments",
    };

    [Fact]
    public async Task IdempotentRoute_RunsARetryOnceAtTheBackend_AndReplaysItsBytes()
    {
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (first, firstBody) = await client.SendAsync("/charges", key, "{\"amount\":5}");
        var (retry, retryBody) = await client.SendAsync("/charges", key, "{\"amount\":5}");

        Assert.Equal(HttpStatusCode.Created, first.StatusCode);
        Assert.False(first.IsReplay());
        Assert.Equal(HttpStatusCode.Created, retry.StatusCode);
        Assert.True(retry.IsReplay());
        Assert.Equal(firstBody, retryBody);
        Assert.Equal(first.Headers.Location, retry.Headers.Location);
        Assert.Equal(1, backend.Runs(key));
    }

    [Fact]
    public async Task MultipartFormSentAgainWithANewBoundary_ReachesTheBackendOnce_AsItsBytesWereSent_AndReplays()
    {
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();
        // Each MultipartFormDataContent picks its own boundary, as curl and browsers do for every form they send.
        static async Task<(HttpRequestMessage Request, byte[] Sent)> FormAsync(string key)
        {
            var form = new MultipartFormDataContent { { new StringContent("5"), "amount" }, { new ByteArrayContent([1, 2, 3]), "receipt", "r.bin" } };
            var request = new HttpRequestMessage(HttpMethod.Post, "/charges") { Content = form };
            request.Headers.Add("Idempotency-Key", key);
            return (request, await form.ReadAsByteArrayAsync());
        }

        var (first, sent) = await FormAsync(key);
        var (retry, sentAgain) = await FormAsync(key);
        using var firstResponse = await client.SendAsync(first);
        using var retryResponse = await client.SendAsync(retry);

        Assert.NotEqual(sent, sentAgain);
        Assert.Equal(HttpStatusCode.Created, firstResponse.StatusCode);
        Assert.Equal(HttpStatusCode.Created, retryResponse.StatusCode);
        Assert.True(retryResponse.IsReplay());
        Assert.Equal(await firstResponse.Content.ReadAsStringAsync(), await retryResponse.Content.ReadAsStringAsync());
        Assert.Equal(1, backend.Runs(key));
        Assert.Equal(sent, backend.Body(key));
        first.Dispose();
        retry.Dispose();
    }

    [Fact]
    public async Task IdempotentRoute_ParallelDuplicates_ReachTheBackendOnce_AndAllGetItsBytes()
    {
        using var client = Client("Bearer caller-1");
        for (var round = 0; round < 3; round++)
        {
            var key = Guid.NewGuid().ToString();
            var responses = await Task.WhenAll(Enumerable.Range(0, 30).Select(_ =>
                Task.Run(() => client.SendAsync("/charges?delayMs=300", key, "{\"amount\":5}"))));

            Assert.All(responses, r => Assert.Equal(HttpStatusCode.Created, r.Response.StatusCode));
            Assert.Single(responses, r => !r.Response.IsReplay());
            Assert.Single(responses.Select(r => Convert.ToBase64String(r.Body)).Distinct());
            Assert.Equal(1, backend.Runs(key));
        }
    }

    [Fact]
    public async Task RouteWithoutIdempotencyMetadata_ForwardsEveryRequest()
    {
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (first, _) = await client.SendAsync("/plain/charges", key, "{\"amount\":5}");
        var (second, _) = await client.SendAsync("/plain/charges", key, "{\"amount\":5}");

        Assert.False(first.IsReplay());
        Assert.False(second.IsReplay());
        Assert.Equal(2, backend.Runs(key));
    }

    [Theory]
    [InlineData("/plain/charges")]
    [InlineData("/charges")]
    public async Task BackendsEmptyErrorAnswer_PassesAsItIs_WithoutABodyOfTheGatewaysOwn(string path)
    {
        // The gateway host's status code pages give its own empty error answers a problem body; not a backend's.
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (response, body) = await client.SendAsync(path + "?emptyNotFound=true", key, "{\"amount\":5}");
        var (again, againBody) = await client.SendAsync(path + "?emptyNotFound=true", key, "{\"amount\":5}");

        Assert.Equal(HttpStatusCode.NotFound, response.StatusCode);
        Assert.Empty(body);
        Assert.Null(response.Content.Headers.ContentType);
        // On the idempotent route the second is the replay: as the first, not a body the gateway host made for it.
        Assert.Equal(path == "/charges", again.IsReplay());
        Assert.Equal(HttpStatusCode.NotFound, again.StatusCode);
        Assert.Empty(againBody);
        Assert.Null(again.Content.Headers.ContentType);
    }

    [Fact]
    public async Task IdempotentRoute_WithoutAKey_Is400_AndNeverReachesTheBackend()
    {
        using var client = Client("Bearer caller-1");
        var before = backend.TotalRuns;

        var (response, body) = await client.SendAsync("/charges", null, "{\"amount\":5}");

        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("application/problem+json", response.ContentType()?.MediaType);
        Assert.EndsWith("key-missing", JsonDocument.Parse(body).RootElement.GetProperty("type").GetString());
        Assert.Equal(before, backend.TotalRuns);
    }

    [Fact]
    public async Task CallersWithDifferentCredentials_DoNotShareKeys_AndEachReplaysItsOwn()
    {
        using var one = Client("Bearer caller-1");
        using var two = Client("Bearer caller-2");
        var key = Guid.NewGuid().ToString();

        var (_, oneBody) = await one.SendAsync("/charges", key, "{\"amount\":5}");
        var (_, twoBody) = await two.SendAsync("/charges", key, "{\"amount\":5}");
        var (oneAgain, oneAgainBody) = await one.SendAsync("/charges", key, "{\"amount\":5}");

        Assert.Equal(2, backend.Runs(key));
        Assert.NotEqual(oneBody, twoBody);
        Assert.True(oneAgain.IsReplay());
        Assert.Equal(oneBody, oneAgainBody);
    }

    [Fact]
    public async Task CallerWithoutTheScopeHeader_Is401_AndNeverReachesTheBackend()
    {
        // Callers the gateway cannot tell apart (cookies, say) must not share one scope's keys.
        using var client = Client(authorization: null);
        var key = Guid.NewGuid().ToString();

        var (response, _) = await client.SendAsync("/charges", key, "{\"amount\":5}", ("Cookie", "session=a"));

        // The application's authentication challenges (here the demo's, in its own words), as for any 401.
        Assert.Equal(HttpStatusCode.Unauthorized, response.StatusCode);
        Assert.Equal("application/problem+json", response.ContentType()?.MediaType);
        Assert.Equal(0, backend.Runs(key));
    }

    [Fact]
    public async Task RouteScopedByAnotherHeader_SeparatesCallersByIt()
    {
        using var client = Client(authorization: null);
        var key = Guid.NewGuid().ToString();

        var (first, _) = await client.SendAsync("/keyed/charges", key, "{\"amount\":5}", ("X-Api-Key", "tenant-a"));
        var (again, _) = await client.SendAsync("/keyed/charges", key, "{\"amount\":5}", ("X-Api-Key", "tenant-a"));
        var (other, _) = await client.SendAsync("/keyed/charges", key, "{\"amount\":5}", ("X-Api-Key", "tenant-b"));

        Assert.False(first.IsReplay());
        Assert.True(again.IsReplay());
        Assert.False(other.IsReplay());
        Assert.Equal(2, backend.Runs(key));
    }

    [Fact]
    public async Task BackendAnswering5xx_ReleasesTheKey_SoTheRetryReachesTheBackendAgain()
    {
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (failed, _) = await client.SendAsync("/charges?failFirst=true", key, "{\"amount\":5}");
        var (retry, _) = await client.SendAsync("/charges?failFirst=true", key, "{\"amount\":5}");
        var (replay, _) = await client.SendAsync("/charges?failFirst=true", key, "{\"amount\":5}");

        Assert.Equal(HttpStatusCode.ServiceUnavailable, failed.StatusCode);
        Assert.Equal(HttpStatusCode.Created, retry.StatusCode);
        Assert.False(retry.IsReplay());
        Assert.True(replay.IsReplay());
        Assert.Equal(2, backend.Runs(key));
    }

    [Theory]
    [InlineData("/strict/charges?abortBeforeHeaders=true", HttpStatusCode.BadGateway)]
    [InlineData("/impatient/charges?delayMs=2500", HttpStatusCode.GatewayTimeout)]
    public async Task BackendThatRanButDidNotAnswer_GatewaysOwn502Or504_LeavesTheKeyInDoubt_NotRunAgain(string path, HttpStatusCode gatewaysOwn)
    {
        // The proxy's own answer, not the backend's: the request had reached the backend (it broke the connection, or
        // was too slow for the gateway), and it ran. (Both routes answer a key in progress at once, without waiting.)
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (first, _) = await client.SendAsync(path, key, "{\"amount\":5}");
        await backend.WaitUntilFinishedAsync(key);
        var (retry, _) = await client.SendAsync(path, key, "{\"amount\":5}");

        Assert.Equal(gatewaysOwn, first.StatusCode);
        Assert.Equal(HttpStatusCode.Conflict, retry.StatusCode);
        Assert.Equal(1, backend.Runs(key));
    }

    [Fact]
    public async Task Http2BackendAnsweringWholeBeforeReadingALargeBody_IsStoredAndReplayed_NotLeftInDoubt()
    {
        // A backend that refuses a request on its headers alone: its whole answer ends the HTTP/2 stream, the rest of
        // the body it never read then fails to go out, and YARP reports that failure after the answer.
        var runs = 0;
        var port = FreePort.Next();
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.ConfigureKestrel(kestrel => kestrel.Listen(IPAddress.Loopback, port, listen => listen.Protocols = HttpProtocols.Http2));
        await using var refusing = builder.Build();
        refusing.MapPost("/{**path}", context =>
        {
            Interlocked.Increment(ref runs);
            context.Response.StatusCode = StatusCodes.Status422UnprocessableEntity;
            return context.Response.WriteAsync("{\"error\":\"too large an amount\"}");
        });
        await refusing.StartAsync();
        var settings = GatewaySettings(backend.Address, GatewayExtensions.DefaultPolicyName);
        settings["ReverseProxy:Clusters:h2:Destinations:one:Address"] = $"http://127.0.0.1:{port.ToString(CultureInfo.InvariantCulture)}/";
        settings["ReverseProxy:Clusters:h2:HttpRequest:Version"] = "2";
        settings["ReverseProxy:Clusters:h2:HttpRequest:VersionPolicy"] = "RequestVersionExact";
        settings["ReverseProxy:Routes:h2:ClusterId"] = "h2";
        settings["ReverseProxy:Routes:h2:Match:Path"] = "/h2/{**rest}";
        settings["ReverseProxy:Routes:h2:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName;
        await using var h2Gateway = await ApiServer.StartAsync(settings);
        using var client = new HttpClient { BaseAddress = h2Gateway.BaseAddress, Timeout = TimeSpan.FromSeconds(60) };
        var key = Guid.NewGuid().ToString();
        // Past the backend's stream window (768 KiB), so that most of it is still to go when the answer comes.
        var body = "{\"amount\":\"" + new string('9', 4_000_000) + "\"}";

        var (first, firstBody) = await client.SendAsync("/h2/charges", key, body, ("Authorization", "Bearer caller-1"));
        var (retry, retryBody) = await client.SendAsync("/h2/charges", key, body, ("Authorization", "Bearer caller-1"));

        Assert.Equal(HttpStatusCode.UnprocessableEntity, first.StatusCode);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, retry.StatusCode);
        Assert.True(retry.IsReplay());
        Assert.Equal(firstBody, retryBody);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task BackendNotListening_GatewaysOwn502_ReleasesTheKey_NothingWasSent()
    {
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (first, _) = await client.SendAsync("/down/charges", key, "{\"amount\":5}");
        var (retry, _) = await client.SendAsync("/down/charges", key, "{\"amount\":5}");

        // Left in doubt, the retry would get 409 at once on this route; stored, a replay of the first 502.
        Assert.Equal(HttpStatusCode.BadGateway, first.StatusCode);
        Assert.Equal(HttpStatusCode.BadGateway, retry.StatusCode);
        Assert.False(retry.IsReplay());
    }

    [Fact]
    public async Task BackendFailingMidBodyAfterTheClientLeft_IsNotRunAgainOnTheRetry()
    {
        // The gateway's 502 to a client that has gone would release the key: the backend's 201 had begun. (The
        // strict route answers a key in progress at once, instead of waiting for it.)
        var key = Guid.NewGuid().ToString();
        using (var impatient = new HttpClient { BaseAddress = gateway.BaseAddress })
        using (var leave = new CancellationTokenSource())
        using (var request = Requests.Post("/strict/charges?delayMs=1000&abortMidBody=true", key, "{\"amount\":5}", ("Authorization", "Bearer caller-1")))
        {
            // The client leaves once the backend runs (its answer begins a second later), however long the claim took.
            var sending = impatient.SendAsync(request, leave.Token);
            await WaitUntilAsync(() => Task.FromResult(backend.Runs(key) == 1), "the backend never ran");
            await leave.CancelAsync();
            await Assert.ThrowsAnyAsync<OperationCanceledException>(() => sending);
        }

        await backend.WaitUntilFinishedAsync(key);
        using var client = Client("Bearer caller-1");
        HttpStatusCode? retry = null;
        try
        {
            retry = (await client.SendAsync("/strict/charges?delayMs=1000&abortMidBody=true", key, "{\"amount\":5}")).Response.StatusCode;
        }
        catch (HttpRequestException)
        {
            // A second run of the backend aborts this retry's connection too.
        }

        Assert.Equal(1, backend.Runs(key));
        Assert.Equal(HttpStatusCode.Conflict, retry);
    }

    [Fact]
    public async Task RouteTimeout_CutsAPlainRoute_ButAnIdempotentRoutesBackendIsAwaitedAndItsAnswerStored()
    {
        // Cut off, an idempotent request's backend may still have run: its answer is what a retry must get.
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (plain, _) = await client.SendAsync("/timed/charges?delayMs=2000", Guid.NewGuid().ToString(), "{\"amount\":5}");
        var (first, firstBody) = await client.SendAsync("/timed-charges/charges?delayMs=2000", key, "{\"amount\":5}");
        var (retry, retryBody) = await client.SendAsync("/timed-charges/charges?delayMs=2000", key, "{\"amount\":5}");

        // YARP's answer to a request cut off (YARP 2.3 reads the time-out as the client leaving: 400), not the 500 of a
        // route whose time-out no middleware applies.
        Assert.True(plain.StatusCode is HttpStatusCode.BadRequest or HttpStatusCode.GatewayTimeout, $"the plain route answered {plain.StatusCode}");
        Assert.Equal(HttpStatusCode.Created, first.StatusCode);
        Assert.True(retry.IsReplay());
        Assert.Equal(firstBody, retryBody);
        Assert.Equal(1, backend.Runs(key));
    }

    [Fact]
    public async Task RouteTimeout_BoundsADuplicatesWaitForTheKeyInProgress_WithA504()
    {
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        // The first runs 5 s: the duplicate, sent once it runs, meets its 1 s time-out well before the replay is there.
        var first = client.SendAsync("/timed-charges/charges?delayMs=5000", key, "{\"amount\":5}");
        await WaitUntilAsync(() => Task.FromResult(backend.Runs(key) == 1), "the backend never ran");
        var (duplicate, _) = await client.SendAsync("/timed-charges/charges?delayMs=5000", key, "{\"amount\":5}");

        Assert.Equal(HttpStatusCode.GatewayTimeout, duplicate.StatusCode);
        Assert.Equal(HttpStatusCode.Created, (await first).Response.StatusCode);
        Assert.Equal(1, backend.Runs(key));
    }

    [Theory]
    [InlineData("/hosted/charges", "Host", "a.example", "b.example", "A.Example:8080")]
    [InlineData("/versioned/charges", "X-Api-Version", "v1", "v2", "V1")]
    public async Task KeySentToARouteToldApartByHostOrAHeaderAlone_Is422KeyReused_NeverTheOtherRoutesReplay(
        string path, string header, string first, string other, string firstAgain)
    {
        // Two routes (two backends, say) behind one path: a key names one request, so sent to the other route it is
        // reused for a different request, as on another path; before, the other route got the first one's answer.
        // Sent again to the first route however the request reaches it (YARP matches hosts and header values
        // without regard to case, a host without a port on any port), it is that route's replay.
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var (one, oneBody) = await client.SendAsync(path, key, "{\"amount\":5}", (header, first));
        var (two, twoBody) = await client.SendAsync(path, key, "{\"amount\":5}", (header, other));
        var (again, againBody) = await client.SendAsync(path, key, "{\"amount\":5}", (header, firstAgain));

        Assert.Equal(HttpStatusCode.Created, one.StatusCode);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, two.StatusCode);
        Assert.EndsWith("key-reused", JsonDocument.Parse(twoBody).RootElement.GetProperty("type").GetString());
        Assert.True(again.IsReplay());
        Assert.Equal(oneBody, againBody);
        Assert.Equal(1, backend.Runs(key));
    }

    [Fact]
    public async Task RouteNamingAPolicy_GetsThatPolicy()
    {
        // The demo's "payments" policy rejects a duplicate of a key in flight instead of waiting for it.
        using var client = Client("Bearer caller-1");
        var key = Guid.NewGuid().ToString();

        var responses = await Task.WhenAll(Enumerable.Range(0, 10).Select(_ =>
            Task.Run(() => client.SendAsync("/strict/charges?delayMs=500", key, "{\"amount\":5}"))));

        // One ran; those that came while it ran were refused, not held; one that came after it (a slow start) replays.
        Assert.Single(responses, r => r.Response.StatusCode == HttpStatusCode.Created && !r.Response.IsReplay());
        Assert.Contains(responses, r => r.Response.StatusCode == HttpStatusCode.Conflict);
        Assert.All(responses.Where(r => r.Response.StatusCode != HttpStatusCode.Created),
            r => Assert.Equal(HttpStatusCode.Conflict, r.Response.StatusCode));
        Assert.Equal(1, backend.Runs(key));
    }

    [Fact]
    public async Task RouteNamingAnUnknownPolicy_StopsTheGatewayAtStart()
    {
        var failure = await Assert.ThrowsAnyAsync<Exception>(() => ApiServer.StartAsync(GatewaySettings(backend.Address, policy: "no-such-policy")));

        Assert.Contains("no-such-policy", failure.ToString(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task Reload_MakingARouteIdempotent_Applies_AndOneNamingAnUnknownPolicy_IsRefusedWithTheRoutesKept()
    {
        using var client = Client("Bearer caller-1");
        var configuration = (IConfigurationRoot)gateway.Services.GetRequiredService<IConfiguration>();

        configuration["ReverseProxy:Routes:plain:Metadata:Idempotency"] = GatewayExtensions.DefaultPolicyName;
        configuration.Reload();
        await WaitUntilAsync(async () => await ReplaysAsync(client, "/plain/orders"), "the reload never made /plain idempotent");

        configuration["ReverseProxy:Routes:plain:Metadata:Idempotency"] = "no-such-policy";
        configuration.Reload();
        await WaitUntilAsync(() => Task.FromResult(gateway.Errors.Exceptions.Any(e => e.ToString().Contains("no-such-policy", StringComparison.Ordinal))),
            "the refused reload was never logged");

        Assert.True(await ReplaysAsync(client, "/plain/orders"), "the routes before the refused reload were not kept");
        var charged = await client.SendAsync("/charges", Guid.NewGuid().ToString(), "{\"amount\":5}");
        Assert.Equal(HttpStatusCode.Created, charged.Response.StatusCode);
    }

    /// <summary>Whether a retry on <paramref name="path"/> is answered as a replay, the backend running once.</summary>
    private async Task<bool> ReplaysAsync(HttpClient client, string path)
    {
        var key = Guid.NewGuid().ToString();
        await client.SendAsync(path, key, "{\"amount\":5}");
        var (retry, _) = await client.SendAsync(path, key, "{\"amount\":5}");
        return retry.IsReplay() && backend.Runs(key) == 1;
    }

    private static async Task WaitUntilAsync(Func<Task<bool>> condition, string failure)
    {
        for (var waited = 0; !await condition(); waited += 50)
        {
            Assert.True(waited < 10_000, failure);
            await Task.Delay(50);
        }
    }

    private HttpClient Client(string? authorization)
    {
        var client = new HttpClient { BaseAddress = gateway.BaseAddress, Timeout = TimeSpan.FromSeconds(60) };
        if (authorization is not null)
        {
            client.DefaultRequestHeaders.TryAddWithoutValidation("Authorization", authorization);
        }

        return client;
    }

    /// <summary>
    /// An API the gateway knows nothing about: every POST counts a run under its <c>Idempotency-Key</c> and answers
    /// 201 with a fresh id; <c>?delayMs=N</c> makes it slow, <c>?failFirst=true</c> answers 503 to a key's first run,
    /// <c>?abortMidBody=true</c> sends the start of a 201 and then aborts the connection, <c>?abortBeforeHeaders=true</c>
    /// aborts it before answering anything, <c>?emptyNotFound=true</c> answers 404 without a body or its length.
    /// </summary>
    private sealed class Backend
    {
        private readonly ConcurrentDictionary<string, int> runs = new();
        private readonly ConcurrentDictionary<string, bool> finished = new();
        private readonly ConcurrentDictionary<string, byte[]> bodies = new();
        private WebApplication app = null!;

        public Uri Address { get; } = new($"http://127.0.0.1:{FreePort.Next().ToString(CultureInfo.InvariantCulture)}/");

        public int TotalRuns => runs.Values.Sum();

        public int Runs(string key) => runs.GetValueOrDefault(key);

        /// <summary>The body the last run of <paramref name="key"/> received.</summary>
        public byte[]? Body(string key) => bodies.GetValueOrDefault(key);

        /// <summary>Waits until a run of <paramref name="key"/> has answered 201, or aborted.</summary>
        public async Task WaitUntilFinishedAsync(string key)
        {
            for (var waited = 0; !finished.ContainsKey(key); waited += 10)
            {
                Assert.True(waited < 10_000, $"the backend never finished {key}");
                await Task.Delay(10);
            }
        }

        public async Task StartAsync()
        {
            var builder = WebApplication.CreateSlimBuilder();
            builder.WebHost.UseUrls(Address.ToString());
            app = builder.Build();
            app.MapPost("/{**path}", async context =>
            {
                var key = context.Request.Headers["Idempotency-Key"].ToString();
                var run = runs.AddOrUpdate(key, 1, (_, n) => n + 1);
                using (var received = new MemoryStream())
                {
                    await context.Request.Body.CopyToAsync(received);
                    bodies[key] = received.ToArray();
                }

                if (int.TryParse(context.Request.Query["delayMs"], CultureInfo.InvariantCulture, out var delay))
                {
                    await Task.Delay(delay);
                }

                if (context.Request.Query["failFirst"] == "true" && run == 1)
                {
                    context.Response.StatusCode = StatusCodes.Status503ServiceUnavailable;
                    return;
                }

                if (context.Request.Query["emptyNotFound"] == "true")
                {
                    // Begun without a length: sent chunked, its end an empty last chunk.
                    context.Response.StatusCode = StatusCodes.Status404NotFound;
                    await context.Response.StartAsync();
                    finished.TryAdd(key, true);
                    return;
                }

                if (context.Request.Query["abortBeforeHeaders"] == "true")
                {
                    finished.TryAdd(key, true);
                    context.Abort();
                    return;
                }

                if (context.Request.Query["abortMidBody"] == "true")
                {
                    context.Response.StatusCode = StatusCodes.Status201Created;
                    await context.Response.WriteAsync("{\"id\":\"");
                    await context.Response.Body.FlushAsync();
                    await Task.Delay(100);
                    finished.TryAdd(key, true);
                    context.Abort();
                    return;
                }

                var id = Guid.NewGuid().ToString();
                context.Response.StatusCode = StatusCodes.Status201Created;
                context.Response.Headers.Location = "/charges/" + id;
                await context.Response.WriteAsJsonAsync(new { id, path = context.Request.Path.Value, run });
                finished.TryAdd(key, true);
            });
            await app.StartAsync();
        }

        public async Task StopAsync() => await app.DisposeAsync();
    }
}
