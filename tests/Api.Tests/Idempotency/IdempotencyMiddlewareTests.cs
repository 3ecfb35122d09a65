using System.Collections.Frozen;
using System.Security.Claims;
using System.Text;
using System.Text.Encodings.Web;
using Microsoft.AspNetCore.Authentication;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using Orleans.Storage;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

[Collection(MiddlewareClusterCollection.Name)]
public sealed class IdempotencyMiddlewareTests(MiddlewareClusterFixture fixture)
{
    private MiddlewareHarness Harness(RequestDelegate? endpoint = null, IdempotencyPolicy? policy = null) =>
        new(fixture, endpoint ?? MiddlewareHarness.Creates(), policy);

    [Fact]
    public async Task EndpointWithoutMetadata_PassesThrough_WithoutAKey()
    {
        var harness = Harness();
        var context = MiddlewareHarness.Request(key: null);
        context.SetEndpoint(new Endpoint(harness.Endpoint, EndpointMetadataCollection.Empty, "plain"));

        await harness.SendAsync(context);

        Assert.Equal(201, context.Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Theory]
    [InlineData(false, "POST")]
    [InlineData(true, "GET")]
    public void RequestTheLayerDoesNotCover_PassesThrough_AllocatingNothing(bool idempotentEndpoint, string method)
    {
        // DESIGN §5: endpoints without metadata pay nothing, nor do methods an idempotent endpoint does not cover.
        var harness = Harness(endpoint: _ => Task.CompletedTask);
        var context = MiddlewareHarness.Request(key: null, method: method);
        context.SetEndpoint(new Endpoint(harness.Endpoint, idempotentEndpoint ? new EndpointMetadataCollection(harness.Metadata) : EndpointMetadataCollection.Empty, "plain"));
        Assert.True(harness.InvokeAsync(context).IsCompletedSuccessfully);

        var before = GC.GetAllocatedBytesForCurrentThread();
        var allDone = true;
        for (var i = 0; i < 100; i++)
        {
            allDone &= harness.InvokeAsync(context).IsCompletedSuccessfully;
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
        Assert.True(allDone);
        Assert.Equal(101, harness.Executions);
    }

    [Theory]
    [InlineData("GET")]
    [InlineData("HEAD")]
    [InlineData("OPTIONS")]
    [InlineData("PUT")]
    [InlineData("DELETE")]
    public async Task NonPostMethods_PassThroughUntouched_UnlessTheEndpointOptsIn(string method)
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key, method: method);
        await harness.SendAsync(key, method: method);

        Assert.Equal(2, harness.Executions);
        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);

        var optedIn = Harness(policy: IdempotencyPolicy.Default with { Methods = new[] { method }.ToFrozenSet(StringComparer.OrdinalIgnoreCase) });
        await optedIn.SendAsync(key, method: method);
        await optedIn.SendAsync(key, method: method);
        Assert.Equal(1, optedIn.Executions);
    }

    [Fact]
    public async Task ProblemInstance_IsThePathAsAUriReference()
    {
        // RFC 9457's instance is a URI reference: the decoded path would read "/orders/a b?c".
        var context = await Harness().SendAsync(key: null, path: "/orders/a b?c");

        Assert.Equal("/orders/a%20b%3Fc", context.Problem().GetProperty("instance").GetString());
    }

    [Fact]
    public async Task MissingKey_Returns400ProblemWithDescribedByLink_AndNothingRuns()
    {
        var harness = Harness();

        var context = await harness.SendAsync(key: null);

        Assert.Equal(400, context.Response.StatusCode);
        var problem = context.Problem();
        Assert.Equal("https://orleans-idempotency.dev/problems/key-missing", problem.GetProperty("type").GetString());
        Assert.Equal(400, problem.GetProperty("status").GetInt32());
        Assert.Equal("/orders", problem.GetProperty("instance").GetString());
        Assert.False(problem.GetProperty("retryable").GetBoolean());
        Assert.Equal(System.Text.Json.JsonValueKind.Null, problem.GetProperty("idempotencyKey").ValueKind);
        Assert.Contains("rel=\"describedby\"", context.Response.Headers.Link.ToString());
        Assert.Equal(0, harness.Executions);
    }

    [Fact]
    public async Task MissingKey_OnAnEndpointThatDoesNotRequireOne_PassesThrough()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { KeyRequired = false });

        await harness.SendAsync(key: null);
        await harness.SendAsync(key: null);

        Assert.Equal(2, harness.Executions);
    }

    [Theory]
    [InlineData("")]
    [InlineData("   ")]
    [InlineData("a,b")]
    [InlineData("a b")]
    [InlineData("a\u0001b")]
    [InlineData("cl\u00e9")]
    [InlineData("\"unterminated")]
    [InlineData("\"a\"b")]
    [InlineData("k;param=1")]
    [InlineData("\"bad \\n escape\"")]
    [InlineData("\"\"")]
    public async Task InvalidKey_Returns400Problem_AndNothingRuns(string key)
    {
        var harness = Harness();

        var context = await harness.SendAsync(key);

        Assert.Equal(400, context.Response.StatusCode);
        Assert.EndsWith("/key-invalid", context.Problem().GetProperty("type").GetString());
        Assert.Equal(0, harness.Executions);
    }

    [Fact]
    public async Task KeyLongerThan255Characters_Returns400()
    {
        var harness = Harness();

        Assert.Equal(400, (await harness.SendAsync(new string('k', 256))).Response.StatusCode);
        Assert.Equal(201, (await harness.SendAsync(new string('k', 254) + Guid.NewGuid().ToString("N")[..1])).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task SeveralKeyHeaders_Return400()
    {
        var harness = Harness();
        var context = MiddlewareHarness.Request(key: null, configure: c => c.Request.Headers[IdempotencyKeyHeader.Name] = new(["a", "b"]));

        await harness.SendAsync(context);

        Assert.Equal(400, context.Response.StatusCode);
        Assert.Equal(0, harness.Executions);
    }

    [Theory]
    [InlineData("123e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456-426614174000")]
    [InlineData("\"a quoted key\"", "a quoted key")]
    [InlineData("\"escaped \\\" quote\"", "escaped \" quote")]
    [InlineData("urn:order/42", "urn:order/42")]
    public void ValidKeys_AreReadAsTheirValue(string header, string expected)
    {
        Assert.Equal(IdempotencyKeyHeader.Status.Valid, IdempotencyKeyHeader.TryRead(header, out var key, out _));
        Assert.Equal(expected, key);
    }

    [Fact]
    public async Task KeySentToAnEndpointToldApartByHostAlone_IsReusedForADifferentRequest_422_NotTheOthersReplay()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var onA = new Endpoint(harness.Endpoint, new EndpointMetadataCollection(harness.Metadata, new HostAttribute("a.example", "A-Alias.example")), "POST /orders on a");
        var onB = new Endpoint(harness.Endpoint, new EndpointMetadataCollection(harness.Metadata, new HostAttribute("b.example")), "POST /orders on b");
        var anyHost = new Endpoint(harness.Endpoint, new EndpointMetadataCollection(harness.Metadata), "POST /orders");
        var everyHost = new Endpoint(harness.Endpoint, new EndpointMetadataCollection(harness.Metadata, new HostAttribute("*")), "POST /orders on *");
        Task<HttpContext> SendAsync(Endpoint endpoint, string host, string? sameKey = null) => harness.SendAsync(MiddlewareHarness.Request(sameKey ?? key, configure: c =>
        {
            c.Request.Host = new HostString(host);
            c.SetEndpoint(endpoint);
        }));

        var first = await SendAsync(onA, "a.example");
        var other = await SendAsync(onB, "b.example");
        var throughItsAlias = await SendAsync(onA, "a-alias.example:8443");

        // Two routes, as two paths are: the key names one request, and sent to the other route it is reused. The
        // same endpoint reached by another of its hosts is the same route.
        Assert.Equal(1, harness.Executions);
        Assert.Equal(422, other.Response.StatusCode);
        Assert.EndsWith("/key-reused", other.Problem().GetProperty("type").GetString());
        Assert.Equal("true", throughItsAlias.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(first.Body(), throughItsAlias.Body());

        // An endpoint not bound to hosts, or bound to every host, ignores the host and hashes as before.
        var unbound = MiddlewareHarness.NewKey();
        var unboundFirst = await SendAsync(anyHost, "a.example", unbound);
        var unboundAgain = await SendAsync(anyHost, "b.example", unbound);
        var boundToEvery = await SendAsync(everyHost, "c.example", unbound);
        Assert.Equal("true", unboundAgain.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(unboundFirst.Body(), unboundAgain.Body());
        Assert.Equal("true", boundToEvery.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(unboundFirst.Body(), boundToEvery.Body());
    }

    [Fact]
    public async Task FirstRequest_RunsTheAction_AndReturnsItsResponseUnmarked()
    {
        var harness = Harness();

        var context = await harness.SendAsync(MiddlewareHarness.NewKey());

        Assert.Equal(201, context.Response.StatusCode);
        Assert.StartsWith("{\"id\":", context.Body());
        Assert.False(context.Response.Headers.ContainsKey("Idempotent-Replayed"));
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task Replay_ReturnsOriginalBytesStatusAndStoredHeaders_MarkedReplayed()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(1, harness.Executions);
        Assert.Equal(201, replay.Response.StatusCode);
        Assert.Equal(first.BodyBytes(), replay.BodyBytes());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(first.Response.Headers.Location, replay.Response.Headers.Location);
        Assert.Equal("application/json", replay.Response.ContentType);
        Assert.Equal(first.BodyBytes().Length, replay.Response.ContentLength);
        Assert.False(replay.Response.Headers.ContainsKey("Set-Cookie"));
        Assert.False(replay.Response.Headers.ContainsKey("X-Not-Stored"));
    }

    [Fact]
    public async Task DefaultStoredHeaders_AreEachReplayed_AsTheActionSetThem()
    {
        // Content-Encoding has tests of its own: it is stored only for a body that arrived encoded.
        var set = new Dictionary<string, string>
        {
            ["Content-Type"] = "application/json",
            ["Content-Language"] = "fr",
            ["Content-Location"] = "/orders/7",
            ["Location"] = "/orders/7",
            ["ETag"] = "\"v1\"",
            ["Last-Modified"] = "Thu, 01 Jan 2026 00:00:00 GMT",
            ["Cache-Control"] = "private, max-age=60",
            ["WWW-Authenticate"] = "Bearer error=\"invalid_token\"",
            ["Allow"] = "GET, POST",
            ["grpc-status"] = "5",
            ["grpc-message"] = "not found",
            ["grpc-status-details-bin"] = "CAU",
        };
        Assert.Equal(IdempotencyPolicy.DefaultStoredHeaders.Order(StringComparer.OrdinalIgnoreCase),
            set.Keys.Append("Content-Encoding").Order(StringComparer.OrdinalIgnoreCase));
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            foreach (var (name, value) in set)
            {
                context.Response.Headers[name] = value;
            }

            await context.Response.WriteAsync("{}");
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.All(set, header => Assert.Equal(header.Value, replay.Response.Headers[header.Key].ToString()));
    }

    [Theory]
    [InlineData(401, "WWW-Authenticate", "Bearer error=\"invalid_token\"")]
    [InlineData(405, "Allow", "GET")]
    public async Task StoredStatusThatRequiresAHeader_IsReplayedWithIt(int status, string header, string value)
    {
        // RFC 9110 §15.5.2 and §15.5.6: as a gateway's backend answers them, stored as any other 4xx.
        var harness = Harness(context =>
        {
            context.Response.StatusCode = status;
            context.Response.Headers[header] = value;
            return Task.CompletedTask;
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(status, replay.Response.StatusCode);
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(value, replay.Response.Headers[header].ToString());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task StoredHeaders_IncludeTheOnesTheEndpointNames_ButNeverSetCookie()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default.WithStoredHeaders("X-Not-Stored", "Set-Cookie"));
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal("1", replay.Response.Headers["X-Not-Stored"]);
        Assert.False(replay.Response.Headers.ContainsKey("Set-Cookie"));
    }

    [Fact]
    public async Task NeverStoredHeaders_AreNotReplayed_EvenWhenTheEndpointNamesThem()
    {
        var never = IdempotencyPolicy.NeverStoredHeaders.ToArray();
        var harness = Harness(async context =>
        {
            foreach (var name in never)
            {
                context.Response.Headers[name] = "from-the-action";
            }

            await MiddlewareHarness.Creates()(context);
        }, IdempotencyPolicy.Default.WithStoredHeaders(never));
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.All(never, name => Assert.NotEqual("from-the-action", replay.Response.Headers[name].ToString()));
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(replay.BodyBytes().Length, replay.Response.ContentLength);
    }

    [Fact]
    public async Task Replay_WithTheQueryInAnotherOrder_IsTheSameRequest()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key, query: "?b=2&a=1");
        var replay = await harness.SendAsync(key, query: "?a=1&b=2");

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
    }

    [Theory]
    [InlineData("{\"amount\":2}", "POST", "/orders", "")]
    [InlineData("{\"amount\":1} ", "POST", "/orders", "")]
    [InlineData("{\"amount\":1}", "PATCH", "/orders", "")]
    [InlineData("{\"amount\":1}", "POST", "/payments", "")]
    [InlineData("{\"amount\":1}", "POST", "/orders", "?x=1")]
    [InlineData("{\"amount\":1}", "POST", "/orders", "?a=2&a=1")]
    [InlineData("{\"amount\":1}", "POST", "/orders", "?a=1&A=2")]
    public async Task SameKeyForADifferentRequest_Returns422_AndNothingRuns(string body, string method, string path, string query)
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        await harness.SendAsync(key, query: query.StartsWith("?a=", StringComparison.Ordinal) ? "?a=1&a=2" : "");

        var other = await harness.SendAsync(key, body, method, path, query);

        Assert.Equal(422, other.Response.StatusCode);
        var problem = other.Problem();
        Assert.EndsWith("/key-reused", problem.GetProperty("type").GetString());
        Assert.Equal(key, problem.GetProperty("idempotencyKey").GetString());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task SameKeyInAnotherScope_IsAnIndependentKey()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        var alice = await harness.SendAsync(key, user: "alice");
        var bob = await harness.SendAsync(key, body: "{\"other\":true}", user: "bob");

        Assert.Equal(201, bob.Response.StatusCode);
        Assert.NotEqual(alice.Body(), bob.Body());
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task ClaimScope_MakesKeysTheTenants_SharedByItsUsers_AndApartFromOtherTenants()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { Scope = IdempotencyScope.Claim("tenant") });
        var key = MiddlewareHarness.NewKey();
        HttpContext Send(string user, string tenant) => MiddlewareHarness.Request(key, user: "", configure: c => c.User =
            new System.Security.Claims.ClaimsPrincipal(new System.Security.Claims.ClaimsIdentity(
                [new(System.Security.Claims.ClaimTypes.NameIdentifier, user), new("tenant", tenant)], "test")));

        var alice = await harness.SendAsync(Send("alice", "acme"));
        var bob = await harness.SendAsync(Send("bob", "acme"));
        var carol = await harness.SendAsync(Send("carol", "globex"));

        Assert.Equal("true", bob.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(alice.Body(), bob.Body());
        Assert.False(carol.Response.Headers.ContainsKey("Idempotent-Replayed"));
        Assert.Equal(2, harness.Executions);
        Assert.Equal(IdempotencyStatus.Completed, (await harness.Grain(key, "claim:tenant:acme").GetAsync()).Status);
    }

    [Theory]
    [InlineData("")]
    [InlineData("  ")]
    public async Task ClaimScope_AnEmptyClaim_IsNoTenant_ItsCallersAreRefused_NeverSharingOneScope(string tenant)
    {
        // An identity provider that gives users without a tenant an empty one: "claim:tenant:" would be one tenant of them all.
        var harness = Harness(policy: IdempotencyPolicy.Default with { Scope = IdempotencyScope.Claim("tenant") });
        var key = MiddlewareHarness.NewKey();

        var alice = await harness.SendAsync(Principal(key, new Claim(ClaimTypes.NameIdentifier, "alice"), new Claim("tenant", tenant)));
        var bob = await harness.SendAsync(Principal(key, new Claim(ClaimTypes.NameIdentifier, "bob"), new Claim("tenant", tenant)));

        Assert.Equal(403, alice.Response.StatusCode);
        Assert.EndsWith("scope-unreadable", alice.Problem().GetProperty("type").GetString());
        Assert.Equal(403, bob.Response.StatusCode);
        Assert.Equal(0, harness.Executions);
    }

    [Fact]
    public async Task HeaderScope_MakesKeysTheApiKeys_AndACallerWithoutOneIsAnonymous()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { Scope = IdempotencyScope.Header("X-Api-Key") });
        var key = MiddlewareHarness.NewKey();
        HttpContext Send(string? apiKey) => MiddlewareHarness.Request(key, user: "",
            configure: c => c.Request.Headers["X-Api-Key"] = apiKey is null ? default : new(apiKey));

        var first = await harness.SendAsync(Send("k-1"));
        var again = await harness.SendAsync(Send("k-1"));
        var other = await harness.SendAsync(Send("k-2"));
        var none = await harness.SendAsync(Send(null));

        Assert.Equal(first.Body(), again.Body());
        Assert.Equal("true", again.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(201, other.Response.StatusCode);
        Assert.Equal(201, none.Response.StatusCode);
        Assert.Equal(3, harness.Executions);
        Assert.Equal(IdempotencyStatus.Completed, (await harness.Grain(key, "header:X-Api-Key:k-1").GetAsync()).Status);
        Assert.Equal(IdempotencyStatus.Completed, (await harness.Grain(key, IdempotencyScope.Anonymous).GetAsync()).Status);
    }

    [Fact]
    public async Task HeaderDigestScope_SeparatesCallersByTheirCredentials_WithoutKeepingThem()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { Scope = IdempotencyScope.HeaderDigest("Authorization") });
        var key = MiddlewareHarness.NewKey();
        HttpContext Send(string token) => MiddlewareHarness.Request(key, user: "",
            configure: c => c.Request.Headers.Authorization = "Bearer " + token);

        var first = await harness.SendAsync(Send("secret-1"));
        var again = await harness.SendAsync(Send("secret-1"));
        var other = await harness.SendAsync(Send("secret-2"));

        Assert.Equal(first.Body(), again.Body());
        Assert.Equal("true", again.Response.Headers["Idempotent-Replayed"]);
        Assert.NotEqual(first.Body(), other.Body());
        Assert.Equal(2, harness.Executions);
        var scope = IdempotencyScope.HeaderDigest("Authorization")(Send("secret-1"))!;
        Assert.StartsWith("header-sha256:Authorization:", scope, StringComparison.Ordinal);
        Assert.DoesNotContain("secret", scope, StringComparison.Ordinal);
        Assert.Equal(IdempotencyStatus.Completed, (await harness.Grain(key, scope).GetAsync()).Status);
    }

    [Fact]
    public async Task AnonymousCallers_ShareOneScope_OrAreRefusedWhenTheEndpointForbidsIt()
    {
        var shared = Harness();
        var key = MiddlewareHarness.NewKey();
        await shared.SendAsync(key, user: "");
        Assert.Equal("true", (await shared.SendAsync(key, user: "")).Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(IdempotencyStatus.Completed, (await shared.Grain(key, IdempotencyScope.Anonymous).GetAsync()).Status);

        var forbidden = Harness(policy: IdempotencyPolicy.Default with { AllowAnonymous = false });
        var refused = await forbidden.SendAsync(MiddlewareHarness.NewKey(), user: "");
        Assert.Equal(401, refused.Response.StatusCode);
        Assert.EndsWith("/scope-required", refused.Problem().GetProperty("type").GetString());
        Assert.Equal(0, forbidden.Executions);
    }

    [Fact]
    public async Task AnonymousCallerRefused_CarriesTheApplicationsChallenge_AndOurProblem()
    {
        var services = new ServiceCollection().AddLogging()
            .AddAuthentication("test").AddScheme<AuthenticationSchemeOptions, HeaderOnlyChallenge>("test", null).Services
            .BuildServiceProvider();
        var forbidden = Harness(policy: IdempotencyPolicy.Default with { AllowAnonymous = false });

        var refused = await forbidden.SendAsync(MiddlewareHarness.Request(MiddlewareHarness.NewKey(), user: "", configure: c => c.RequestServices = services));

        Assert.Equal(401, refused.Response.StatusCode);
        Assert.Equal(HeaderOnlyChallenge.Challenge, refused.Response.Headers.WWWAuthenticate.ToString());
        Assert.EndsWith("/scope-required", refused.Problem().GetProperty("type").GetString());
        Assert.Equal(0, forbidden.Executions);
    }

    /// <summary>A scheme whose challenge, like JWT bearer's, sets the status and the header and writes no body.</summary>
    private sealed class HeaderOnlyChallenge(IOptionsMonitor<AuthenticationSchemeOptions> options, ILoggerFactory logger, UrlEncoder encoder)
        : AuthenticationHandler<AuthenticationSchemeOptions>(options, logger, encoder)
    {
        public const string Challenge = "Bearer realm=\"orders\"";

        protected override Task<AuthenticateResult> HandleAuthenticateAsync() => Task.FromResult(AuthenticateResult.NoResult());

        protected override Task HandleChallengeAsync(AuthenticationProperties properties)
        {
            Response.StatusCode = StatusCodes.Status401Unauthorized;
            Response.Headers.WWWAuthenticate = Challenge;
            return Task.CompletedTask;
        }
    }

    [Fact]
    public async Task ConcurrentDuplicate_WaitsForTheFirst_AndReplaysItsResponse()
    {
        var release = new TaskCompletionSource();
        var harness = Harness(MiddlewareHarness.CreatesAfter(release.Task));
        var key = MiddlewareHarness.NewKey();

        var first = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(async () => (await harness.Grain(key).GetAsync()).Status == IdempotencyStatus.InProgress);
        var duplicates = Enumerable.Range(0, 5).Select(_ => harness.SendAsync(key)).ToArray();
        await Task.Delay(200);
        Assert.All(duplicates, d => Assert.False(d.IsCompleted));

        release.SetResult();
        var original = await first;
        foreach (var duplicate in await Task.WhenAll(duplicates))
        {
            Assert.Equal(original.BodyBytes(), duplicate.BodyBytes());
            Assert.Equal("true", duplicate.Response.Headers["Idempotent-Replayed"]);
        }

        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ConcurrentDuplicate_InRejectMode_Returns409WithRetryAfter()
    {
        var release = new TaskCompletionSource();
        var harness = Harness(MiddlewareHarness.CreatesAfter(release.Task), IdempotencyPolicy.Default with { ConcurrentDuplicates = ConcurrentDuplicateHandling.Reject });
        var key = MiddlewareHarness.NewKey();
        var first = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(async () => (await harness.Grain(key).GetAsync()).Status == IdempotencyStatus.InProgress);

        var duplicate = await harness.SendAsync(key);

        Assert.Equal(409, duplicate.Response.StatusCode);
        Assert.Equal("1", duplicate.Response.Headers.RetryAfter);
        var problem = duplicate.Problem();
        Assert.EndsWith("/request-in-progress", problem.GetProperty("type").GetString());
        Assert.True(problem.GetProperty("retryable").GetBoolean());
        release.SetResult();
        await first;
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ConcurrentDuplicate_WaitingPastTheTimeout_Returns409WithRetryAfter()
    {
        var release = new TaskCompletionSource();
        var harness = Harness(MiddlewareHarness.CreatesAfter(release.Task), IdempotencyPolicy.Default with { WaitTimeout = TimeSpan.FromSeconds(2) });
        var key = MiddlewareHarness.NewKey();
        var first = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(async () => (await harness.Grain(key).GetAsync()).Status == IdempotencyStatus.InProgress);

        var waitBegan = fixture.Time.GetUtcNow();
        var duplicate = harness.SendAsync(key);
        for (var i = 0; i < 100 && !duplicate.IsCompleted; i++)
        {
            await Task.Delay(50);
            fixture.Time.Advance(TimeSpan.FromMilliseconds(200));
        }

        Assert.Equal(409, (await duplicate).Response.StatusCode);
        Assert.Equal("1", (await duplicate).Response.Headers.RetryAfter);
        // The policy's 2 s, by the clock the wait is timed on: neither at once nor the default's 10 s (the clock moves
        // 200 ms each 50 ms of real time, leaving a slow machine 1.75 s of it to answer once the wait is over).
        Assert.InRange(fixture.Time.GetUtcNow() - waitBegan, TimeSpan.FromSeconds(2), TimeSpan.FromSeconds(9));
        release.SetResult();
        await first;
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ActionThrows_ReleasesTheKey_SoTheRetryRuns()
    {
        var fail = true;
        var harness = Harness(context => fail ? throw new InvalidOperationException("boom") : MiddlewareHarness.Creates()(context));
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(key));
        fail = false;
        var retry = await harness.SendAsync(key);

        Assert.Equal(201, retry.Response.StatusCode);
        Assert.False(retry.Response.Headers.ContainsKey("Idempotent-Replayed"));
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task ActionThrowingAfterARequestTimeoutOutsideTheLayerFired_ReleasesTheKey_ForItsClientIsStillThere()
    {
        // UseRequestTimeouts() fires the request's token too; the action, detached from it, failed on its own.
        using var timeout = new CancellationTokenSource();
        var harness = Harness(async _ =>
        {
            await timeout.CancelAsync();
            throw new InvalidOperationException("boom");
        });
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key, configure: c =>
        {
            c.RequestAborted = timeout.Token;
            c.Features.Set<Microsoft.AspNetCore.Http.Timeouts.IHttpRequestTimeoutFeature>(new TimedOut(timeout.Token));
        });

        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(context));

        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Theory]
    [InlineData(500)]
    [InlineData(503)]
    [InlineData(408)]
    [InlineData(425)]
    [InlineData(429)]
    public async Task RetryableStatus_ReleasesTheKey_SoTheRetryRuns_ButNotAnotherRequest(int status)
    {
        var statuses = new Queue<int>([status, 201]);
        var harness = Harness(context => MiddlewareHarness.Creates(statuses.Dequeue())(context));
        var key = MiddlewareHarness.NewKey();

        Assert.Equal(status, (await harness.SendAsync(key)).Response.StatusCode);
        // Released, the key is still the first request's: another under it is refused (DESIGN §2), nothing run.
        var other = await harness.SendAsync(key, body: "{\"amount\":2}");
        var retry = await harness.SendAsync(key);

        Assert.Equal(422, other.Response.StatusCode);
        Assert.Equal(201, retry.Response.StatusCode);
        Assert.Equal(2, harness.Executions);
        Assert.Equal("true", (await harness.SendAsync(key)).Response.Headers["Idempotent-Replayed"]);
    }

    [Theory]
    [InlineData(400)]
    [InlineData(404)]
    [InlineData(409)]
    [InlineData(200)]
    public async Task SuccessOrClientError_IsStoredAndReplayed(int status)
    {
        var harness = Harness(MiddlewareHarness.Creates(status));
        var key = MiddlewareHarness.NewKey();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(status, replay.Response.StatusCode);
        Assert.Equal(first.BodyBytes(), replay.BodyBytes());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task LapsedLease_Returns409OutcomeUnknown_AndNeverRerunsSilently()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key);
        var fingerprint = await RequestFingerprint.ComputeAsync(context.Request, long.MaxValue, CancellationToken.None);
        // An earlier attempt (in a process that then died) claimed the key and never completed.
        await harness.Grain(key).ClaimAsync(new ClaimRequest(Guid.NewGuid(), fingerprint!, TimeSpan.FromSeconds(30), TimeSpan.FromHours(24)));
        fixture.Time.Advance(TimeSpan.FromSeconds(31));

        await harness.SendAsync(context);

        Assert.Equal(409, context.Response.StatusCode);
        Assert.EndsWith("/outcome-unknown", context.Problem().GetProperty("type").GetString());
        Assert.Equal(409, (await harness.SendAsync(key)).Response.StatusCode);
        Assert.Equal(0, harness.Executions);
    }

    [Fact]
    public async Task LapsedLease_WithTheAtLeastOnceOptIn_RerunsOnce()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { OnLapsedLease = LapsedLeasePolicy.Reclaim });
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key);
        var fingerprint = await RequestFingerprint.ComputeAsync(context.Request, long.MaxValue, CancellationToken.None);
        await harness.Grain(key).ClaimAsync(new ClaimRequest(Guid.NewGuid(), fingerprint!, TimeSpan.FromSeconds(30), TimeSpan.FromHours(24), LapsedLeasePolicy.Reclaim));
        fixture.Time.Advance(TimeSpan.FromSeconds(31));

        await harness.SendAsync(context);
        var replay = await harness.SendAsync(key);

        Assert.Equal(201, context.Response.StatusCode);
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ReplayOfAKeyThisProcessReplayedBefore_NeedsNoStore_EvenWhileTheStoreIsDown()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var first = await harness.SendAsync(key);
        await harness.SendAsync(key);
        // The record is now only in storage, and storage is down: only this process's memory can answer.
        await fixture.Cluster.DeactivateAsync(harness.Grain(key));
        var replay = await fixture.WhileStoreDownAsync(() => harness.SendAsync(key));

        Assert.Equal(201, replay.Response.StatusCode);
        Assert.Equal(first.BodyBytes(), replay.BodyBytes());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task DifferentRequest_UnderAKeyThisProcessRemembers_IsStillRefused()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        await harness.SendAsync(key);
        await harness.SendAsync(key);

        var other = await harness.SendAsync(key, body: "{\"amount\":2}");

        Assert.Equal(422, other.Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task KeyThisProcessRemembers_IsForgottenWhenItsRetentionEnds()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        await harness.SendAsync(key);
        await harness.SendAsync(key);
        fixture.Time.Advance(IdempotencyPolicy.Default.Retention);

        var after = await harness.SendAsync(key);

        Assert.Equal(201, after.Response.StatusCode);
        Assert.False(after.Response.Headers.ContainsKey("Idempotent-Replayed"));
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task MultipartFormSentAgainWithANewBoundary_IsTheSameRequest_AndReplays()
    {
        // The endpoint still reads the form, and its bytes, after the layer hashed the form.
        var harness = Harness(async context =>
        {
            var sent = context.Request.ContentLength;
            var form = await context.Request.ReadFormAsync();
            var bytes = await new StreamReader(context.Request.Body).ReadToEndAsync();
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync($"{form["amount"]} {(bytes.Length == sent ? "whole" : bytes.Length)} {Guid.NewGuid()}");
        });
        var key = MiddlewareHarness.NewKey();
        HttpContext Form(string boundary) => MiddlewareHarness.Request(key,
            $"--{boundary}\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n1\r\n--{boundary}--\r\n",
            configure: context => context.Request.ContentType = $"multipart/form-data; boundary={boundary}");

        var first = await harness.SendAsync(Form("----WebKitFormBoundary7MA4YWxkTrZu0gW"));
        var again = await harness.SendAsync(Form("----WebKitFormBoundaryqK1M5b8GdR2cXv3e"));

        Assert.Equal(201, first.Response.StatusCode);
        Assert.Equal(201, again.Response.StatusCode);
        Assert.Equal("true", again.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(first.Body(), again.Body());
        Assert.StartsWith("1 whole ", first.Body(), StringComparison.Ordinal);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task StoreDown_Returns503WithRetryAfter_AndNothingRuns()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var context = await fixture.WhileStoreDownAsync(() => harness.SendAsync(key));

        Assert.Equal(503, context.Response.StatusCode);
        Assert.Equal("1", context.Response.Headers.RetryAfter);
        var problem = context.Problem();
        Assert.EndsWith("/store-unavailable", problem.GetProperty("type").GetString());
        Assert.True(problem.GetProperty("retryable").GetBoolean());
        Assert.Equal(0, harness.Executions);
        Assert.Equal(201, (await harness.SendAsync(key)).Response.StatusCode);
    }

    [Fact]
    public async Task StoreDown_The503IsLoggedOnce_NamingTheScopedKey_NotOnceATry()
    {
        var callsLog = new FakeLogger<IdempotencyGrainCalls>();
        var problemsLog = new FakeLogger<IdempotencyProblems>();
        var harness = new MiddlewareHarness(fixture, MiddlewareHarness.Creates(), callsLog: callsLog, problemsLog: problemsLog);
        var key = MiddlewareHarness.NewKey();

        Assert.Equal(503, (await fixture.WhileStoreDownAsync(() => harness.SendAsync(key))).Response.StatusCode);

        Assert.True(fixture.Store.RefusedOf(harness.Grain(key).GetGrainId()) > 1, "The claim was not tried again.");
        var warning = Assert.Single(problemsLog.Collector.GetSnapshot(), r => r.Level >= LogLevel.Warning);
        Assert.Contains(new IdempotencyKey("user:alice", key).ToString(), warning.Message, StringComparison.Ordinal);
        // The claim's tries are Debug lines; its release, left to wait for the store, logs its own tries in the background.
        Assert.Contains(callsLog.Collector.GetSnapshot(), r => r.Level == LogLevel.Debug && r.Message.Contains("asking again", StringComparison.Ordinal));
        Assert.DoesNotContain(callsLog.Collector.GetSnapshot(), r => r.Level >= LogLevel.Warning && r.Message.Contains("asking again", StringComparison.Ordinal));
    }

    [Fact]
    public async Task CallAnsweredOnlyAfterFailedTries_IsOneInformationLine_NotAWarningATry()
    {
        var callsLog = new FakeLogger<IdempotencyGrainCalls>();
        // A budget the fake clock cannot spend while the test waits on a slow machine.
        var calls = fixture.Calls(Microsoft.Extensions.Options.Options.Create(new IdempotencyOptions { ClusterRetryBudget = TimeSpan.FromHours(1) }), callsLog);
        var grain = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
        var failure = fixture.Store.Failure;
        fixture.Store.Failure = () => new TimeoutException("The silo did not answer (test switch).");
        Task<ClaimResult> claiming;
        try
        {
            fixture.Store.Down = true;
            var request = new ClaimRequest(Guid.NewGuid(), new byte[32], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1));
            claiming = calls.CallAsync(grain, g => g.ClaimAsync(request), CancellationToken.None);
            await fixture.ClockRunsUntilAsync(() => fixture.Store.RefusedOf(grain.GetGrainId()) >= 3);
        }
        finally
        {
            fixture.Store.Down = false;
            fixture.Store.Failure = failure;
        }

        await fixture.ClockRunsUntilAsync(() => claiming.IsCompleted);
        Assert.Equal(ClaimOutcome.Acquired, (await claiming).Outcome);
        var log = callsLog.Collector.GetSnapshot();
        Assert.DoesNotContain(log, r => r.Level >= LogLevel.Warning);
        var tries = log.Count(r => r.Level == LogLevel.Debug);
        Assert.True(tries >= 3, "Each failed try is still logged, at Debug.");
        var answered = Assert.Single(log, r => r.Level == LogLevel.Information);
        Assert.Contains(grain.GetPrimaryKeyString(), answered.Message, StringComparison.Ordinal);
        Assert.Contains(nameof(TimeoutException), answered.Message, StringComparison.Ordinal);
        Assert.Equal((tries + 1).ToString(System.Globalization.CultureInfo.InvariantCulture), answered.GetStructuredStateValue("Attempt"));
    }

    [Fact]
    public async Task CallAnsweredAfterFailing_WhoseLineCannotBeWritten_StillGivesItsAnswer()
    {
        // The claim lands but its answer is lost; asked again, it is given back. The line saying so cannot be written.
        var log = new FailingLog<IdempotencyGrainCalls>("answered at attempt");
        var calls = fixture.Calls(MiddlewareClusterFixture.Options(), log);
        var grain = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
        fixture.Store.LoseNextAnswer(grain.GetGrainId());
        var request = new ClaimRequest(Guid.NewGuid(), new byte[32], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1));

        var claim = await calls.CallAsync(grain, g => g.ClaimAsync(request), CancellationToken.None);

        Assert.Equal(ClaimOutcome.Acquired, claim.Outcome);
        Assert.Equal(1, log.Failures);
    }

    [Fact]
    public async Task StoreFailingWithACancellationOfItsOwn_Returns503_AndNothingRuns()
    {
        // A storage command cancelled within the store, not by the client: the store failing, not the client leaving.
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var failure = fixture.Store.Failure;
        fixture.Store.Failure = () => new OperationCanceledException("A storage command was cancelled.");
        HttpContext context;
        try
        {
            context = await fixture.WhileStoreDownAsync(() => harness.SendAsync(key));
        }
        finally
        {
            fixture.Store.Failure = failure;
        }

        Assert.Equal(503, context.Response.StatusCode);
        Assert.Equal(0, harness.Executions);
        Assert.Equal(201, (await harness.SendAsync(key)).Response.StatusCode);
    }

    [Fact]
    public async Task ClaimThatLandsAfterItsCallerGot503_CannotHoldTheKey_SoTheRetryRuns()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key).GetGrainId();
        var lostWrite = fixture.Store.LoseNextWriteInAnOutage(grain);
        Assert.Equal(503, (await harness.SendAsync(key)).Response.StatusCode);

        // The outage ends; the attempt's release, retried in the background, gets through.
        fixture.Store.Down = false;
        await fixture.ClockRunsUntilAsync(() => fixture.Store.WritesOf(grain) > 0);

        // Only then does the claim written before the outage reach the store.
        await Assert.ThrowsAnyAsync<InconsistentStateException>(await lostWrite);
        Assert.Equal(201, (await harness.SendAsync(key)).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ClaimWrittenAsTheStoreWentDown_FoundLapsedByARetry_IsFreedByItsLateRelease_SoTheNextRetryRuns()
    {
        // The claim's write commits but fails to answer as the store goes down, taking 4 s to fail as a timed-out write
        // does: the caller answers 503, nothing ran, and the release keeps trying in the background.
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key).GetGrainId();
        var failsAfter = TimeSpan.FromSeconds(4);
        fixture.Store.BeforeNextWrite(grain, () =>
        {
            fixture.Time.Advance(failsAfter);
            return Task.CompletedTask;
        });
        var lostWrite = fixture.Store.LoseNextWriteInAnOutage(grain);
        Assert.Equal(503, (await harness.SendAsync(key)).Response.StatusCode);
        await (await lostWrite)();

        // The claim's lease lapses; the release, waking then, fails once more.
        var refused = fixture.Store.RefusedOf(grain);
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease - failsAfter);
        await fixture.ClockRunsUntilAsync(() => fixture.Store.RefusedOf(grain) > refused);

        await StoreReturns_RetryFindsTheKeyInDoubt_UntilTheReleaseLandsAsync(harness, key, grain);
    }

    [Fact]
    public async Task ClaimWrittenAsTheStoreWentDown_IsFreedByItsRelease_AfterAnOutageLongerThanTheLease()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key).GetGrainId();
        var lostWrite = fixture.Store.LoseNextWriteInAnOutage(grain);
        Assert.Equal(503, (await harness.SendAsync(key)).Response.StatusCode);
        await (await lostWrite)();

        // The store stays down for twice the lease; the release keeps trying all along.
        var refused = fixture.Store.RefusedOf(grain);
        await fixture.RunClockAsync(IdempotencyPolicy.Default.Lease * 2);
        Assert.True(fixture.Store.RefusedOf(grain) > refused + 10, "The release stopped trying during the outage.");

        await StoreReturns_RetryFindsTheKeyInDoubt_UntilTheReleaseLandsAsync(harness, key, grain);
    }

    // The store comes back, and the client's retry reaches the key before the release does: outcome unknown. Then the
    // release lands, and the next retry runs the action, for the first time.
    private async Task StoreReturns_RetryFindsTheKeyInDoubt_UntilTheReleaseLandsAsync(MiddlewareHarness harness, string key, GrainId grain)
    {
        // The release's last try has failed and it waits for the clock: none is in flight as the store comes back.
        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == 1));
        fixture.Store.Down = false;
        Assert.Equal(409, (await harness.SendAsync(key)).Response.StatusCode);
        var writes = fixture.Store.WritesOf(grain);
        await fixture.ClockRunsUntilAsync(() => fixture.Store.WritesOf(grain) > writes);

        Assert.Equal(201, (await harness.SendAsync(key)).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task StoreOutage_ReleasesLeftByManyRequests_AreTriedOneAtATime_AndAllLandWhenItEnds()
    {
        var harness = Harness();
        var keys = Enumerable.Range(0, 40).Select(_ => MiddlewareHarness.NewKey()).ToArray();
        var grains = keys.Select(k => harness.Grain(k).GetGrainId()).ToArray();
        var answers = await fixture.WhileStoreDownAsync(async () =>
        {
            var answers = await Task.WhenAll(keys.Select(k => harness.SendAsync(k)));
            await fixture.RunClockAsync(TimeSpan.FromSeconds(2));
            await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == keys.Length));
            var refused = grains.Sum(fixture.Store.RefusedOf);
            await fixture.RunClockAsync(TimeSpan.FromSeconds(10));

            // Each release retried on its own, about once a second, would have made ~400 writes in these 10 s.
            Assert.InRange(grains.Sum(fixture.Store.RefusedOf) - refused, 1, 25);
            return answers;
        });
        Assert.All(answers, answer => Assert.Equal(503, answer.Response.StatusCode));

        await fixture.ClockRunsUntilAsync(() => grains.All(g => fixture.Store.WritesOf(g) > 0));
    }

    [Fact]
    public async Task StoreOutage_ACompletionWaitingBehindReleases_LandsInTheFirstBatchWhenItEnds()
    {
        var (harness, completed, running, first, released) = await RunningWhileTheStoreGoesDownAsync(100);
        var completedGrain = harness.Grain(completed).GetGrainId();

        // Then the action ends, and its completion fails too.
        running.SetResult();
        Assert.Equal(201, (await first).Response.StatusCode);
        var releasedBeforeIt = -1;
        fixture.Store.BeforeNextWrite(completedGrain, () =>
        {
            releasedBeforeIt = released.Count(g => fixture.Store.WritesOf(g) > 0);
            return Task.CompletedTask;
        });

        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == released.Length + 1));
        fixture.Store.Down = false;
        await fixture.ClockRunsUntilAsync(() => fixture.Store.WritesOf(completedGrain) > 1);

        // In the first batch once a probe (of either kind) lands, beside at most 31 releases that may land as it is
        // written: not behind the 100 (a queue in order of arrival put 97 before it).
        Assert.InRange(releasedBeforeIt, 0, 32);
        var replay = await harness.SendAsync(completed);
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
    }

    [Fact]
    public async Task ACompletionThatKeepsFailing_DoesNotHoldBackTheReleasesWaitingBehindIt()
    {
        var (harness, completed, running, first, released) = await RunningWhileTheStoreGoesDownAsync(3);
        var completedGrain = harness.Grain(completed).GetGrainId();

        // The completion's own writes keep failing (its silo is gone, say), the store or not.
        var failing = true;
        Func<Task> fail = null!;
        fail = () =>
        {
            if (!failing)
            {
                return Task.CompletedTask;
            }

            fixture.Store.BeforeNextWrite(completedGrain, fail);
            return Task.FromException(new IOException("its silo is gone"));
        };
        fixture.Store.BeforeNextWrite(completedGrain, fail);
        running.SetResult();
        Assert.Equal(201, (await first).Response.StatusCode);
        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == released.Length + 1));

        fixture.Store.Down = false;
        var back = fixture.Time.GetUtcNow();
        await fixture.ClockRunsUntilAsync(() => released.All(g => fixture.Store.WritesOf(g) > 0));
        failing = false;

        Assert.True(fixture.Time.GetUtcNow() - back < TimeSpan.FromSeconds(10), "The releases waited for the completion's lease to end.");
    }

    [Fact]
    public async Task WhileTheStoreSeemsDown_AReleaseWaitsItsTurn_WithoutATryOfItsOwn()
    {
        var calls = fixture.Calls(MiddlewareClusterFixture.Options());
        var first = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
        var second = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
        var policy = IdempotencyPolicy.Default;
        await fixture.WhileStoreDownAsync(async () =>
        {
            await calls.ReleaseAsync(first, Guid.NewGuid(), policy.Lease, policy.Retention);
            Assert.True(fixture.Store.RefusedOf(first.GetGrainId()) > 0);
            await fixture.RunClockAsync(TimeSpan.FromSeconds(2));

            await calls.ReleaseAsync(second, Guid.NewGuid(), policy.Lease, policy.Retention);
            Assert.Equal(0, fixture.Store.RefusedOf(second.GetGrainId()));
            return true;
        });

        await fixture.ClockRunsUntilAsync(() => fixture.Store.WritesOf(first.GetGrainId()) > 0 && fixture.Store.WritesOf(second.GetGrainId()) > 0);
        Assert.Equal(0, calls.WaitingForTheStore);
    }

    [Fact]
    public async Task Stopping_EndsTheBackgroundWrites_AndLogsEachKeyLeftWaiting()
    {
        var log = new FakeLogger<IdempotencyGrainCalls>();
        var calls = fixture.Calls(MiddlewareClusterFixture.Options(), log);
        var key = new IdempotencyKey("user:alice", MiddlewareHarness.NewKey());
        var grain = fixture.Grains.GetIdempotencyGrain(key);
        var policy = IdempotencyPolicy.Default;
        await fixture.WhileStoreDownAsync(async () =>
        {
            await calls.ReleaseAsync(grain, Guid.NewGuid(), policy.Lease, policy.Retention);
            await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(calls.WaitingForTheStore == 1));
            calls.Dispose();
            return true;
        });

        await fixture.RunClockAsync(TimeSpan.FromSeconds(3));
        Assert.Equal(0, fixture.Store.WritesOf(grain.GetGrainId()));
        Assert.Contains(log.Collector.GetSnapshot(), record => record.Level == LogLevel.Error && record.Message.Contains(grain.GetPrimaryKeyString()));
    }

    [Fact]
    public async Task OversizedResponse_ReachesTheFirstCallerWhole_AndItsReplayIs409ResponseNotStored()
    {
        var big = new string('x', 5000);
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync(big[..2500]);
            await context.Response.Body.WriteAsync(Encoding.UTF8.GetBytes(big[2500..]));
        }, IdempotencyPolicy.Default with { MaxStoredResponseBytes = 4096 });
        var key = MiddlewareHarness.NewKey();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(big, first.Body());
        Assert.Equal(409, replay.Response.StatusCode);
        var problem = replay.Problem();
        Assert.EndsWith("/response-not-stored", problem.GetProperty("type").GetString());
        Assert.Contains("5000-byte", problem.GetProperty("detail").GetString());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task OversizedRequestBody_Returns413_AndNothingRuns()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { MaxRequestBodyBytes = 10 });

        var context = await harness.SendAsync(MiddlewareHarness.NewKey(), body: "{\"amount\":12345}");

        Assert.Equal(413, context.Response.StatusCode);
        Assert.Equal(0, harness.Executions);
    }

    [Fact]
    public async Task RequestBody_IsRewound_SoTheEndpointReadsItWhole()
    {
        string? seen = null;
        var harness = Harness(async context =>
        {
            using var reader = new StreamReader(context.Request.Body);
            seen = await reader.ReadToEndAsync();
            context.Response.StatusCode = 201;
        });

        await harness.SendAsync(MiddlewareHarness.NewKey(), body: "{\"hello\":\"world\"}");

        Assert.Equal("{\"hello\":\"world\"}", seen);
    }

    [Fact]
    public async Task ResponseBodyFeature_IsRestoredAfterTheAction()
    {
        var harness = Harness();
        var context = MiddlewareHarness.Request(MiddlewareHarness.NewKey());
        var before = context.BodyFeature();

        await harness.SendAsync(context);

        Assert.Same(before, context.BodyFeature());
    }

    [Fact]
    public async Task LongAction_RenewsItsLease_AndItsResponseIsStored()
    {
        var (harness, started, release) = LongAction();
        var key = MiddlewareHarness.NewKey();
        var first = harness.SendAsync(key);
        await started.Task.WaitAsync(TimeSpan.FromSeconds(10));
        var claimedUntil = (await harness.Grain(key).GetAsync()).LeaseExpiresAt;

        // Four renewal periods: well past the original lease.
        for (var i = 0; i < 4; i++)
        {
            var before = (await harness.Grain(key).GetAsync()).LeaseExpiresAt;
            await fixture.ClockRunsUntilAsync(async () => (await harness.Grain(key).GetAsync()).LeaseExpiresAt > before);
        }

        release.SetResult();
        await first;

        Assert.True(fixture.Time.GetUtcNow() > claimedUntil);
        Assert.Equal("true", (await harness.SendAsync(key)).Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ClaimAnsweredLate_IsRenewedBeforeItsLeaseRunsOut_EvenWhenARenewalFails()
    {
        var writing = new TaskCompletionSource();
        var answer = new TaskCompletionSource();
        var renewalFailed = new TaskCompletionSource();
        var (harness, started, release) = LongAction();
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key).GetGrainId();
        fixture.Store.BeforeNextWrite(grain, async () =>
        {
            writing.TrySetResult();
            await answer.Task;
        });

        var first = harness.SendAsync(key);
        await writing.Task.WaitAsync(TimeSpan.FromSeconds(10));
        // The claim is written with a 30-second lease; its answer arrives 20 seconds later.
        fixture.Time.Advance(TimeSpan.FromSeconds(20));
        answer.SetResult();
        await started.Task.WaitAsync(TimeSpan.FromSeconds(10));
        var claimedUntil = (await harness.Grain(key).GetAsync()).LeaseExpiresAt;

        // The first renewal comes at half of the 10 seconds left, and fails; the next comes before the lease ends.
        fixture.Store.BeforeNextWrite(grain, () =>
        {
            renewalFailed.TrySetResult();
            return Task.FromException(new IOException("The store failed this write (test)."));
        });
        fixture.Time.Advance(TimeSpan.FromSeconds(5));
        await renewalFailed.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await MiddlewareHarness.WaitUntilAsync(async () =>
        {
            fixture.Time.Advance(TimeSpan.FromMilliseconds(250));
            return (await harness.Grain(key).GetAsync()).LeaseExpiresAt > claimedUntil;
        });
        Assert.True(fixture.Time.GetUtcNow() < claimedUntil, "Renewed only after the lease had ended.");

        fixture.Time.Advance(claimedUntil - fixture.Time.GetUtcNow() + TimeSpan.FromSeconds(1));
        release.SetResult();
        await first;

        Assert.Equal("true", (await harness.SendAsync(key)).Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task PolicyWhosePredicatesThrow_KeepsTheKey_StoredOrInDoubt_NeverReleased_AndSaysSo()
    {
        var log = new FakeLogger<IdempotencyMiddleware>();
        var broken = IdempotencyPolicy.Default with
        {
            ReleasesKey = _ => throw new NotImplementedException("a predicate with a bug"),
            ReleasesOnException = (_, _) => throw new NotImplementedException("another"),
        };
        var answered = new MiddlewareHarness(fixture, MiddlewareHarness.Creates(), broken, log: log);
        var throwing = new MiddlewareHarness(fixture, _ => throw new InvalidOperationException("declined"), broken, log: log);
        var stored = MiddlewareHarness.NewKey();
        var inDoubt = MiddlewareHarness.NewKey();

        var first = await answered.SendAsync(stored);
        var replay = await answered.SendAsync(stored);
        // The caller gets the action's exception, not the predicate's.
        await Assert.ThrowsAsync<InvalidOperationException>(() => throwing.SendAsync(inDoubt));

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(first.Body(), replay.Body());
        Assert.Equal(1, answered.Executions);
        Assert.Equal(IdempotencyStatus.InProgress, (await throwing.Grain(inDoubt).GetAsync()).Status);
        Assert.Equal(2, log.Collector.GetSnapshot().Count(r => r.Level == LogLevel.Error && r.Exception is NotImplementedException));
    }

    [Fact]
    public async Task CompletionThatLandedButWhoseAnswerWasLost_IsFoundStoredWhenAskedAgain_AndReplays()
    {
        // A connection dropped after the completion committed: asked again, the grain reads the record it wrote and
        // takes the same completion as done, neither refused nor queued to be tried in the background.
        var key = MiddlewareHarness.NewKey();
        GrainId grain = default;
        var log = new FakeLogger<IdempotencyMiddleware>();
        var harness = new MiddlewareHarness(fixture, context =>
        {
            fixture.Store.LoseNextAnswer(grain);
            return MiddlewareHarness.Creates()(context);
        }, log: log);
        grain = harness.Grain(key).GetGrainId();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(201, first.Response.StatusCode);
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(first.Body(), replay.Body());
        Assert.Equal(1, harness.Executions);
        Assert.Equal(0, harness.Calls.WaitingForTheStore);
        Assert.Equal(IdempotencyStatus.Completed, (await harness.Grain(key).GetAsync()).Status);
        Assert.DoesNotContain(log.Collector.GetSnapshot(), r => r.Level >= LogLevel.Warning);
    }

    [Fact]
    public async Task RenewalThatLandedButWhoseAnswerWasLost_IsFollowedByRenewalsPastTheApisReckoning_AndTheResultIsStored()
    {
        var (harness, started, release) = LongAction();
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key).GetGrainId();
        var first = harness.SendAsync(key);
        await started.Task.WaitAsync(TimeSpan.FromSeconds(10));
        var claimedUntil = (await harness.Grain(key).GetAsync()).LeaseExpiresAt;

        // The first renewal lands, pushing the grain's lease 10 seconds past this process's reckoning, but its answer
        // is lost; the store is then down until that reckoning has passed.
        var writes = fixture.Store.WritesOf(grain);
        fixture.Store.LoseNextAnswer(grain);
        await fixture.ClockRunsUntilAsync(() => fixture.Store.WritesOf(grain) > writes);
        await fixture.WhileStoreDownAsync(async () =>
        {
            await fixture.ClockRunsUntilAsync(() => fixture.Time.GetUtcNow() > claimedUntil + TimeSpan.FromSeconds(1));
            return true;
        });

        // The grain, not this process, knows whether its lease still runs: a renewal now keeps the claim. The clock
        // moves a second at a time, each step given real time for a renewal (a tenth of the lease apart) to land well
        // before the grain's lease ends, about nine seconds on.
        writes = fixture.Store.WritesOf(grain);
        for (var step = 0; step < 6 && fixture.Store.WritesOf(grain) == writes; step++)
        {
            fixture.Time.Advance(TimeSpan.FromSeconds(1));
            for (var waited = 0; waited < 2000 && fixture.Store.WritesOf(grain) == writes; waited += 20)
            {
                await Task.Delay(20);
            }
        }

        Assert.True((await harness.Grain(key).GetAsync()).LeaseExpiresAt > claimedUntil + TimeSpan.FromSeconds(15), "No renewal kept the claim once the store was back.");
        await fixture.RunClockAsync(TimeSpan.FromSeconds(15));
        release.SetResult();
        await first.WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal("true", (await harness.SendAsync(key)).Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
    }

    // An action under a 30-second lease that creates once released; started says it runs, and with it its renewal
    // timer: advancing the clock before that would skip a tick.
    private (MiddlewareHarness Harness, TaskCompletionSource Started, TaskCompletionSource Release) LongAction()
    {
        var started = new TaskCompletionSource();
        var release = new TaskCompletionSource();
        var harness = Harness(context =>
        {
            started.TrySetResult();
            return MiddlewareHarness.CreatesAfter(release.Task)(context);
        }, IdempotencyPolicy.Default with { Lease = TimeSpan.FromSeconds(30) });
        return (harness, started, release);
    }

    [Fact]
    public void NamedPolicy_IsResolvedFromTheEndpointsMetadata_AndAnUnknownNameIsRefused()
    {
        // The options' part; the middleware applying it is proven over HTTP (payments' policy rejects duplicates).
        var options = new IdempotencyOptions();
        options.AddPolicy("reject", p => p with { ConcurrentDuplicates = ConcurrentDuplicateHandling.Reject });

        Assert.Equal(ConcurrentDuplicateHandling.Reject, options.Resolve(new IdempotentAttribute { PolicyName = "reject" }).ConcurrentDuplicates);
        Assert.Equal(ConcurrentDuplicateHandling.Wait, options.Resolve(new IdempotentAttribute()).ConcurrentDuplicates);
        Assert.Throws<InvalidOperationException>(() => options.Resolve(new IdempotentAttribute { PolicyName = "missing" }));
    }

    [Fact]
    public void RetentionOrWaitPastTenYears_IsRefusedWhenThePolicyIsResolved_NotOnEveryRequest()
    {
        // A "forever" would overflow the time each request adds it to, failing every request as if the store were down.
        Assert.Throws<ArgumentOutOfRangeException>(() => (IdempotencyPolicy.Default with { Retention = TimeSpan.MaxValue }).Validate());
        Assert.Throws<ArgumentOutOfRangeException>(() => (IdempotencyPolicy.Default with { WaitTimeout = TimeSpan.MaxValue }).Validate());
        (IdempotencyPolicy.Default with { Retention = IdempotencyPolicy.MaxDuration, WaitTimeout = IdempotencyPolicy.MaxDuration }).Validate();
    }

    [Fact]
    public void StoredResponseLimitPastWhatAGrainCallCarries_IsRefusedWhenThePolicyIsResolved()
    {
        // Orleans closes a connection whose message passes 100 MB: a completion that large would never land.
        Assert.Throws<ArgumentOutOfRangeException>(() => (IdempotencyPolicy.Default with { MaxStoredResponseBytes = 150 * 1024 * 1024 }).Validate());
        (IdempotencyPolicy.Default with { MaxStoredResponseBytes = IdempotencyPolicy.MaxStorableResponseBytes }).Validate();
    }

    [Fact]
    public async Task ChunkedRequestBodyOverTheLimit_Returns413_NotA500()
    {
        var harness = Harness(policy: IdempotencyPolicy.Default with { MaxRequestBodyBytes = 1000 });
        var context = MiddlewareHarness.Request(MiddlewareHarness.NewKey(), body: new string('x', 200_000),
            configure: c => c.Request.ContentLength = null);

        await harness.SendAsync(context);

        Assert.Equal(413, context.Response.StatusCode);
        Assert.Equal(0, harness.Executions);
    }

    [Theory]
    [InlineData(400, false)]
    [InlineData(408, true)]
    [InlineData(413, false)]
    public async Task BodyTheServerRefusesWhileItIsRead_IsKestrelsStatusAsAProblem_AndNothingRunsOrIsClaimed(int status, bool retryable)
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key, configure: c => c.Request.Body = new RefusedBody(status));

        await harness.SendAsync(context);

        Assert.Equal(status, context.Response.StatusCode);
        var problem = context.Problem();
        Assert.EndsWith("/body-unreadable", problem.GetProperty("type").GetString());
        Assert.Equal(retryable, problem.GetProperty("retryable").GetBoolean());
        Assert.Equal(key, problem.GetProperty("idempotencyKey").GetString());
        Assert.Equal(0, harness.Executions);
        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task RequestTimeoutFiringWhileTheBodyIsRead_ReachesTheTimeoutMiddleware_NotAnEmpty200()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();
        using var timeout = new CancellationTokenSource();
        await timeout.CancelAsync();
        var context = MiddlewareHarness.Request(key, configure: c =>
        {
            c.RequestAborted = timeout.Token;
            c.Features.Set<Microsoft.AspNetCore.Http.Timeouts.IHttpRequestTimeoutFeature>(new TimedOut(timeout.Token));
        });

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => harness.SendAsync(context));

        Assert.Equal(0, harness.Executions);
        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task ClientThatResetsItsRequestMidBody_IsLeftWithoutAnswer_NotA500_AndNothingRunsOrIsClaimed()
    {
        // An HTTP/2 stream reset while the layer reads the body: Kestrel's read fails with an IOException.
        var harness = Harness();
        using var requests = new MetricCollector<long>(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.requests");
        var key = MiddlewareHarness.NewKey();
        using var gone = new CancellationTokenSource();
        var context = MiddlewareHarness.Request(key, configure: c =>
        {
            c.Request.Body = new RefusedBody(new IOException("The client reset the request stream.")) { AsItFails = gone.Cancel };
            c.RequestAborted = gone.Token;
        });

        await harness.SendAsync(context);
        Assert.Equal("abandoned", Assert.Single(requests.GetMeasurementSnapshot()).Tags["result"]);

        // Nothing written: the status as the request found it, no body.
        Assert.Equal(200, context.Response.StatusCode);
        Assert.Empty(context.BodyBytes());
        Assert.Equal(0, harness.Executions);
        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task ActionThatFailsAfterItsClientLeft_LeavesTheKeyInDoubt_InsteadOfReleasingIt()
    {
        using var disconnect = new CancellationTokenSource();
        var harness = Harness(async context =>
        {
            await disconnect.CancelAsync();
            // The connection's token reached the action some other way (an earlier middleware kept it, say).
            disconnect.Token.ThrowIfCancellationRequested();
        });
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key, configure: c => c.RequestAborted = disconnect.Token);

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => harness.SendAsync(context));
        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task ClientThatLeavesMidResponse_IsHiddenFromTheAction_AndTheWholeResponseIsStored()
    {
        using var disconnect = new CancellationTokenSource();
        var sawDisconnect = true;
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("first half,");
            await disconnect.CancelAsync();
            sawDisconnect = context.RequestAborted.IsCancellationRequested;
            try
            {
                // What ASP.NET Core's JSON writers do: stop at the next flush once the client has gone, and say nothing.
                await context.Response.WriteAsync("second half", context.RequestAborted);
            }
            catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
            {
            }
        });
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key, configure: c =>
        {
            c.RequestAborted = disconnect.Token;
            c.Response.Body = new ClosedWhenCancelled(disconnect.Token);
        });

        await harness.SendAsync(context);
        var replay = await harness.SendAsync(key);

        Assert.False(sawDisconnect);
        Assert.Equal("first half,", context.Body());
        Assert.Equal(disconnect.Token, context.RequestAborted);
        Assert.Equal(201, replay.Response.StatusCode);
        Assert.Equal("first half,second half", replay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task RequestTimeoutOutsideTheLayer_StillSendsItsClientTheWholeResponse()
    {
        // A time-out middleware before the layer links the request's token and cancels it while the client is there.
        using var timeout = new CancellationTokenSource();
        var harness = WritingTwoHalves(timeout);
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key, configure: c => c.RequestAborted = timeout.Token);

        await harness.SendAsync(context);
        var replay = await harness.SendAsync(key);

        Assert.Equal(201, context.Response.StatusCode);
        Assert.Equal("first half,second half", context.Body());
        Assert.Equal("first half,second half", replay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task RequestTimeoutOutsideTheLayer_FiringWhileADuplicateWaits_ReachesTheTimeoutMiddleware_NotAnEmpty200()
    {
        // UseRequestTimeouts() answers 504 only when the cancellation reaches it; swallowed, the client got an empty 200.
        var (harness, key, running, first) = await KeyInProgressAsync();
        using var timeout = new CancellationTokenSource();
        var duplicate = MiddlewareHarness.Request(key, configure: c =>
        {
            c.RequestAborted = timeout.Token;
            c.Features.Set<Microsoft.AspNetCore.Http.Timeouts.IHttpRequestTimeoutFeature>(new TimedOut(timeout.Token));
        });

        var waiting = await CancelWhileWaitingAsync(harness.SendAsync(duplicate), timeout);

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => waiting);
        running.SetResult();
        await first;
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ClientLeavingWhileADuplicateWaits_IsLetGoQuietly_AndNothingRuns()
    {
        var (harness, key, running, first) = await KeyInProgressAsync();
        using var gone = new CancellationTokenSource();
        var duplicate = MiddlewareHarness.Request(key, configure: c => c.RequestAborted = gone.Token);

        await await CancelWhileWaitingAsync(harness.SendAsync(duplicate), gone);
        running.SetResult();
        await first;

        // Nothing written for no one: not a problem, not a replay.
        Assert.Equal(200, duplicate.Response.StatusCode);
        Assert.Equal("", duplicate.Body());
        Assert.Equal(1, harness.Executions);
    }

    // An action answering 201 in two writes, the request's token firing between them (a time-out, the client there).
    private MiddlewareHarness WritingTwoHalves(CancellationTokenSource firedBetween) => Harness(async context =>
    {
        context.Response.StatusCode = 201;
        await context.Response.WriteAsync("first half,");
        await firedBetween.CancelAsync();
        await context.Response.WriteAsync("second half");
    });

    // A request claims its key and runs until `running` completes; the store goes down meanwhile, and `releases` other
    // requests find it down: their releases have failed in the background since, and wait.
    private async Task<(MiddlewareHarness Harness, string Key, TaskCompletionSource Running, Task<HttpContext> First, GrainId[] Released)>
        RunningWhileTheStoreGoesDownAsync(int releases)
    {
        var running = new TaskCompletionSource();
        var harness = Harness(MiddlewareHarness.CreatesAfter(running.Task));
        var key = MiddlewareHarness.NewKey();
        var first = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Executions == 1));
        var keys = Enumerable.Range(0, releases).Select(_ => MiddlewareHarness.NewKey()).ToArray();
        fixture.Store.Down = true;
        Assert.All(await Task.WhenAll(keys.Select(k => harness.SendAsync(k))), answer => Assert.Equal(503, answer.Response.StatusCode));
        await fixture.RunClockAsync(TimeSpan.FromSeconds(2));
        return (harness, key, running, first, [.. keys.Select(k => harness.Grain(k).GetGrainId())]);
    }

    // A key whose first request runs until the returned source completes.
    private async Task<(MiddlewareHarness Harness, string Key, TaskCompletionSource Running, Task<HttpContext> First)> KeyInProgressAsync()
    {
        var running = new TaskCompletionSource();
        var harness = Harness(async context =>
        {
            await running.Task;
            context.Response.StatusCode = 201;
        });
        var key = MiddlewareHarness.NewKey();
        var first = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(async () => (await fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", key)).GetAsync()).Status == IdempotencyStatus.InProgress);
        return (harness, key, running, first);
    }

    // Cancels the request while it waits on a key in progress, then moves the clock on until its wait ends.
    private async Task<Task<HttpContext>> CancelWhileWaitingAsync(Task<HttpContext> sending, CancellationTokenSource cancel)
    {
        await Task.Delay(200);
        Assert.False(sending.IsCompleted);
        await cancel.CancelAsync();
        for (var i = 0; i < 40 && !sending.IsCompleted; i++)
        {
            fixture.Time.Advance(TimeSpan.FromMilliseconds(200));
            await Task.WhenAny(sending, Task.Delay(20));
        }

        return sending;
    }

    private sealed class TimedOut(CancellationToken token) : Microsoft.AspNetCore.Http.Timeouts.IHttpRequestTimeoutFeature
    {
        public CancellationToken RequestTimeoutToken => token;

        public void DisableTimeout()
        {
        }
    }

    [Fact]
    public async Task WriteFailingForAnotherReasonThanAGoneClient_ReachesTheAction_EvenAfterTheTokenFired()
    {
        // A time-out fired the token with the client there; then the server refused a write (say, past Content-Length).
        using var timeout = new CancellationTokenSource();
        var harness = WritingTwoHalves(timeout);
        var key = MiddlewareHarness.NewKey();
        var context = MiddlewareHarness.Request(key, configure: c =>
        {
            c.RequestAborted = timeout.Token;
            c.Response.Body = new ClosedWhenCancelled(timeout.Token, () => new InvalidOperationException("too many bytes"));
        });

        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(context));
        await harness.AssertLeftInDoubtAsync(key);
    }

    /// <summary>A connection's body as a server has it once its client has gone: every write fails.</summary>
    private sealed class ClosedWhenCancelled(CancellationToken gone, Func<Exception>? failure = null) : MemoryStream
    {
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            Fail();
            base.Write(buffer);
        }

        public override void Write(byte[] buffer, int offset, int count)
        {
            Fail();
            base.Write(buffer, offset, count);
        }

        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            Fail();
            return base.WriteAsync(buffer, cancellationToken);
        }

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        {
            Fail();
            return base.WriteAsync(buffer, offset, count, cancellationToken);
        }

        public override Task FlushAsync(CancellationToken cancellationToken)
        {
            Fail();
            return base.FlushAsync(cancellationToken);
        }

        private void Fail()
        {
            if (gone.IsCancellationRequested)
            {
                throw failure?.Invoke() ?? new IOException("The client has gone.");
            }
        }
    }

    [Fact]
    public async Task AUserNamedAnonymous_NeverSharesKeysWithAnonymousCallers()
    {
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key, user: "");
        var named = await harness.SendAsync(key, body: "{\"other\":1}", user: "anonymous");

        Assert.Equal(201, named.Response.StatusCode);
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task AuthenticatedCallersTheScopeCannotRead_AreRefused_NeverSharingOneScope()
    {
        // Principals with only a Name claim (an API-key handler, say): each would otherwise land in the anonymous scope.
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        var alice = await harness.SendAsync(Principal(key, new Claim(ClaimTypes.Name, "alice")));
        var bob = await harness.SendAsync(Principal(key, new Claim(ClaimTypes.Name, "bob")));

        Assert.Equal(403, alice.Response.StatusCode);
        Assert.EndsWith("scope-unreadable", alice.Problem().GetProperty("type").GetString());
        Assert.Equal(403, bob.Response.StatusCode);
        Assert.Equal(0, harness.Executions);
    }

    [Fact]
    public async Task TokenKeepingItsSubClaim_ScopesKeysByIt()
    {
        // A JWT handler that does not map claim names keeps "sub" instead of NameIdentifier.
        var harness = Harness();
        var key = MiddlewareHarness.NewKey();

        var alice = await harness.SendAsync(Principal(key, new Claim("sub", "alice")));
        var bob = await harness.SendAsync(Principal(key, new Claim("sub", "bob")));
        var aliceAgain = await harness.SendAsync(Principal(key, new Claim("sub", "alice")));

        Assert.Equal(201, alice.Response.StatusCode);
        Assert.Equal(201, bob.Response.StatusCode);
        Assert.Equal("true", aliceAgain.Response.Headers[IdempotencyMiddleware.ReplayedHeader].ToString());
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task ScopeLongerThanAStoreKeyHolds_IsStoodForByItsDigest_StillOnePerCaller()
    {
        // A raw bearer token as the scope (IdempotencyScope.Header): kept whole, it would be too long for PostgreSQL's index.
        var harness = Harness(policy: IdempotencyPolicy.Default with { Scope = IdempotencyScope.Header("X-Api-Key") });
        var key = MiddlewareHarness.NewKey();
        var alice = new string('a', 3000) + "1";
        var bob = new string('a', 3000) + "2";
        HttpContext From(string apiKey) => MiddlewareHarness.Request(key, configure: c => c.Request.Headers["X-Api-Key"] = apiKey);

        var first = await harness.SendAsync(From(alice));
        var other = await harness.SendAsync(From(bob));
        var again = await harness.SendAsync(From(alice));

        Assert.Equal(201, first.Response.StatusCode);
        Assert.Equal(201, other.Response.StatusCode);
        Assert.Equal("true", again.Response.Headers[IdempotencyMiddleware.ReplayedHeader].ToString());
        Assert.Equal(2, harness.Executions);
        Assert.True(new IdempotencyKey("header:X-Api-Key:" + alice, key).ToGrainKey().Length < IdempotencyKey.MaxScopeBytes);
    }

    private static HttpContext Principal(string key, params Claim[] claims) =>
        MiddlewareHarness.Request(key, user: "", configure: c => c.User = new ClaimsPrincipal(new ClaimsIdentity(claims, "test")));

    [Fact]
    public async Task NoContentResponse_IsReplayedWithoutABody()
    {
        var harness = Harness(context =>
        {
            context.Response.StatusCode = 204;
            return Task.CompletedTask;
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(204, replay.Response.StatusCode);
        Assert.Null(replay.Response.ContentLength);
        Assert.Empty(replay.BodyBytes());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
    }

    [Theory]
    [InlineData("unknown policy")]
    [InlineData("lease past retention")]
    public async Task EndpointWhosePolicyDoesNotResolve_StopsTheStart_InsteadOfFailingEachRequest(string fault)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Services.AddIdempotency();
        await using var app = builder.Build();
        app.UseIdempotency();
        app.MapPost("/fine", () => Results.Ok()).RequireIdempotency();
        var faulty = app.MapPost("/charges", () => Results.Ok());
        if (fault == "unknown policy")
        {
            faulty.RequireIdempotency("no-such-policy");
        }
        else
        {
            faulty.RequireIdempotency(p => p with { Lease = TimeSpan.FromDays(2) });
        }

        var failure = await Assert.ThrowsAnyAsync<InvalidOperationException>(() => app.StartAsync());

        Assert.Contains("/charges", failure.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void UseIdempotencyTwice_Throws()
    {
        var app = new ApplicationBuilder(new ServiceCollection().BuildServiceProvider());
        app.UseIdempotency();

        var error = Assert.Throws<InvalidOperationException>(() => app.UseIdempotency());
        Assert.Contains("twice", error.Message);
    }
}
