using System.Security.Claims;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>The operator's surface: reading a key, and settling one whose outcome is unknown.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class IdempotencyKeyEndpointsTests
{
    private readonly MiddlewareClusterFixture fixture;
    private readonly FakeLogger<IdempotencyKeysHttp> log = new();
    private readonly FakeLogger<IdempotencyProblems> problemsLog = new();
    private readonly IdempotencyKeysHttp keys;

    public IdempotencyKeyEndpointsTests(MiddlewareClusterFixture fixture)
    {
        this.fixture = fixture;
        var options = MiddlewareClusterFixture.Options();
        keys = new IdempotencyKeysHttp(fixture.Calls(options), new IdempotencyProblems(options, problemsLog), options, fixture.Time, log);
    }

    // An action that began its answer and then failed: it may have taken effect, so its key is left in doubt.
    private async Task<(MiddlewareHarness Harness, string Key)> KeyInDoubtAsync()
    {
        var harness = new MiddlewareHarness(fixture, async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("{\"id\":");
            throw new InvalidOperationException("failed halfway");
        });
        var key = MiddlewareHarness.NewKey();
        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(key));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        Assert.Equal(409, (await harness.SendAsync(key)).Response.StatusCode);
        return (harness, key);
    }

    [Fact]
    public async Task ResolveUnderAPolicyWhoseReleasesKeyThrows_StoresTheOperatorsAnswer_NotA500()
    {
        var options = MiddlewareClusterFixture.Options();
        options.Value.DefaultPolicy = IdempotencyPolicy.Default with { ReleasesKey = _ => throw new NotImplementedException("a predicate with a bug") };
        var brokenLog = new FakeLogger<IdempotencyKeysHttp>();
        var broken = new IdempotencyKeysHttp(fixture.Calls(options), new IdempotencyProblems(options, problemsLog), options, fixture.Time, brokenLog);
        var (harness, key) = await KeyInDoubtAsync();

        var resolved = await CallAsync(broken.ResolveAsync, key, JsonSerializer.Serialize(new { response = new { status = 201, body = "{}" } }));
        var replay = await harness.SendAsync(key);

        Assert.Equal(200, resolved.Status);
        Assert.Equal(201, replay.Response.StatusCode);
        Assert.Equal(1, harness.Executions);
        Assert.Contains(brokenLog.Collector.GetSnapshot(), r => r.Level == LogLevel.Error && r.Exception is NotImplementedException);
    }

    [Fact]
    public async Task KeyInDoubt_ResolvedWithTheResponseTheActionGave_ReplaysIt_AndTheActionNeverRunsAgain()
    {
        var (harness, key) = await KeyInDoubtAsync();
        var response = new { status = 201, headers = new[] { new { name = "Content-Type", value = "application/json" } }, body = "{\"id\":\"order-7\"}" };

        var resolved = await CallAsync(keys.ResolveAsync, key, JsonSerializer.Serialize(new { response }));
        var replay = await harness.SendAsync(key);

        Assert.Equal(200, resolved.Status);
        Assert.Equal(201, replay.Response.StatusCode);
        Assert.Equal("application/json", replay.Response.ContentType);
        Assert.Equal("{\"id\":\"order-7\"}", replay.Body());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(1, harness.Executions);
        var read = await CallAsync(keys.ReadAsync, key, "");
        Assert.Equal("completed", read.Json.GetProperty("status").GetString());
        Assert.Equal("{\"id\":\"order-7\"}", Encoding.UTF8.GetString(Convert.FromBase64String(read.Json.GetProperty("responseBodyBase64").GetString()!)));
    }

    [Fact]
    public async Task StoreDown_AnOperatorsReadIs503_LoggedOnceNamingTheScopedKey()
    {
        var key = MiddlewareHarness.NewKey();

        var read = await fixture.WhileStoreDownAsync(() => CallAsync(keys.ReadAsync, key, ""));

        Assert.Equal(503, read.Status);
        var warning = Assert.Single(problemsLog.Collector.GetSnapshot());
        Assert.Equal(LogLevel.Warning, warning.Level);
        Assert.Contains(new IdempotencyKey("user:alice", key).ToString(), warning.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ResolutionRepeatingAHeaderApart_ReplaysEveryValueOfIt()
    {
        var (harness, key) = await KeyInDoubtAsync();
        var response = new
        {
            status = 201,
            headers = new[]
            {
                new { name = "Cache-Control", value = "no-cache" },
                new { name = "Content-Type", value = "application/json" },
                new { name = "cache-control", value = "private" },
            },
            body = "{}",
        };

        Assert.Equal(200, (await CallAsync(keys.ResolveAsync, key, JsonSerializer.Serialize(new { response }))).Status);
        var replay = await harness.SendAsync(key);

        Assert.Equal("no-cache,private", replay.Response.Headers.CacheControl.ToString());
        Assert.Equal("application/json", replay.Response.ContentType);
    }

    [Fact]
    public async Task KeyInDoubt_ResolvedWithNoResponse_IsReleased_AndTheNextRequestRunsTheAction()
    {
        var (harness, key) = await KeyInDoubtAsync();

        var resolved = await CallAsync(keys.ResolveAsync, key, "{\"release\":true}");

        Assert.Equal(200, resolved.Status);
        Assert.Equal("none", resolved.Json.GetProperty("status").GetString());
        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(key));
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task ResolutionWithoutAClaim_WhoseAnswerWasLostAndAskedAgainByTheServer_AnswersSettled_NotNothingChanged()
    {
        var (harness, key) = await KeyInDoubtAsync();
        fixture.Store.LoseNextAnswer(harness.Grain(key).GetGrainId());

        var resolved = await CallAsync(keys.ResolveAsync, key, "{\"release\":true}");

        Assert.Equal(200, resolved.Status);
        Assert.Equal("none", resolved.Json.GetProperty("status").GetString());
        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task KeyNotInDoubt_Is409_AndNothingChanges()
    {
        var harness = new MiddlewareHarness(fixture, MiddlewareHarness.Creates());
        var key = MiddlewareHarness.NewKey();
        var first = await harness.SendAsync(key);

        var refused = await CallAsync(keys.ResolveAsync, key, "{\"release\":true}");
        var replay = await harness.SendAsync(key);

        Assert.Equal(409, refused.Status);
        Assert.EndsWith("key-not-in-doubt", refused.Json.GetProperty("type").GetString());
        Assert.Equal(first.Body(), replay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task KeyClaimedAgainSinceTheOperatorsRead_ResolutionNamingTheClaimTheyRead_Is409KeyChanged_AndNothingChanges()
    {
        // An endpoint that re-runs lapsed keys; its action fails halfway, leaving each attempt in doubt.
        var reclaiming = new MiddlewareHarness(fixture, async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("{\"id\":");
            throw new InvalidOperationException("failed halfway");
        }, IdempotencyPolicy.Default with { OnLapsedLease = LapsedLeasePolicy.Reclaim });
        var key = MiddlewareHarness.NewKey();
        await Assert.ThrowsAsync<InvalidOperationException>(() => reclaiming.SendAsync(key));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        var read = await CallAsync(keys.ReadAsync, key, "");
        var claimRead = read.Json.GetProperty("claim").GetString()!;
        // Before the operator decides, a retry claims the key again and is left in doubt in turn.
        await Assert.ThrowsAsync<InvalidOperationException>(() => reclaiming.SendAsync(key));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);

        var stale = await CallAsync(keys.ResolveAsync, key, JsonSerializer.Serialize(new { release = true, claim = claimRead }));
        var now = await CallAsync(keys.ReadAsync, key, "");
        var current = await CallAsync(keys.ResolveAsync, key, JsonSerializer.Serialize(new { release = true, claim = now.Json.GetProperty("claim").GetString() }));

        Assert.Equal(409, stale.Status);
        Assert.EndsWith("key-changed", stale.Json.GetProperty("type").GetString());
        Assert.Equal("lapsed", now.Json.GetProperty("status").GetString());
        Assert.NotEqual(claimRead, now.Json.GetProperty("claim").GetString());
        Assert.Equal("lapsed", read.Json.GetProperty("status").GetString());
        Assert.Equal(200, current.Status);
        Assert.Equal("none", current.Json.GetProperty("status").GetString());
        Assert.Equal(2, reclaiming.Executions);
    }

    [Fact]
    public async Task KeyQuotedAsTheHeaderSendsIt_NamesTheKeyItQuotes()
    {
        var (harness, key) = await KeyInDoubtAsync();

        var read = await CallAsync(keys.ReadAsync, $"\"{key}\"", "");
        var resolved = await CallAsync(keys.ResolveAsync, $"\"{key}\"", "{\"release\":true}");
        var badlyQuoted = await CallAsync(keys.ReadAsync, $"\"{key}", "");

        Assert.Equal("outcomeUnknown", read.Json.GetProperty("status").GetString());
        Assert.Equal(200, resolved.Status);
        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(key));
        Assert.Equal(2, harness.Executions);
        Assert.Equal(400, badlyQuoted.Status);
        Assert.EndsWith("request-invalid", badlyQuoted.Json.GetProperty("type").GetString());
    }

    [Theory]
    [InlineData(3_000, -1, "")]
    [InlineData(10, 0, "\"")]
    [InlineData(10, 0xD800, "")]
    public async Task KeyOfADigestedScope_IsNamedByTheDigestLogsShow_AndAsTheGrainKeyHoldsIt(int length, int lastChar, string quote)
    {
        // A scope too long for a grain key, holding a NUL or half a surrogate pair, is stored (and logged) as its digest;
        // the key beside it in the log is as stored, quotes included (a Once API key's scope may be digested too).
        // The last character as a number: xUnit would carry half a surrogate pair in a string as U+FFFD.
        var scope = new string('s', length) + (lastChar < 0 ? "" : ((char)lastChar).ToString());
        var key = new IdempotencyKey(scope, quote + MiddlewareHarness.NewKey() + quote);
        await fixture.Grains.GetIdempotencyGrain(key).ClaimAsync(new ClaimRequest(Guid.NewGuid(), [1], IdempotencyPolicy.Default.Lease, IdempotencyPolicy.Default.Retention));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        var logged = IdempotencyKey.StoredScope(scope);
        Assert.True(IdempotencyKey.IsDigest(logged), logged);

        var read = await CallAsync(keys.ReadAsync, key.Key, "", logged);
        var resolved = await CallAsync(keys.ResolveAsync, key.Key, "{\"release\":true}", logged);

        Assert.Equal("lapsed", read.Json.GetProperty("status").GetString());
        Assert.Equal(200, resolved.Status);
        Assert.Equal(IdempotencyStatus.None, (await fixture.Grains.GetIdempotencyGrain(key).GetAsync()).Status);
    }

    [Theory]
    [InlineData("once:app:jobs")]
    [InlineData("once:http:user:alice")]
    public async Task OnceKeyBeginningWithAQuote_IsNamedAsItIs_NotAsTheKeyItWouldQuote(string scope)
    {
        // The Once API's keys are never a header's quoted form: ExecuteOnceAsync takes any text, and a path segment may
        // hold quotes. The key the quotes would hold is in doubt too: read as a header's, the operator would settle it.
        var bare = MiddlewareHarness.NewKey();
        var key = new IdempotencyKey(scope, $"\"{bare}\"");
        foreach (var inDoubt in new[] { key, new IdempotencyKey(scope, bare) })
        {
            await fixture.Grains.GetIdempotencyGrain(inDoubt).ClaimAsync(new ClaimRequest(Guid.NewGuid(), [1], IdempotencyPolicy.Default.Lease, IdempotencyPolicy.Default.Retention));
        }

        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        await fixture.Grains.GetIdempotencyGrain(new IdempotencyKey(scope, bare)).ResolveAsync(new StoredResponse(200, [], "1"u8.ToArray(), false, 1), null);

        var read = await CallAsync(keys.ReadAsync, key.Key, "", key.Scope);

        Assert.Equal("lapsed", read.Json.GetProperty("status").GetString());
    }

    [Fact]
    public async Task KeysNoRecordCanHold_Are400_NotAStoreFailure()
    {
        // PostgreSQL's text holds no NUL, nor its index a longer key: asked of the store, each was a 503 to retry for ever.
        string[] unstorable = ["a\0b", new string('é', 128)];
        foreach (var key in unstorable)
        {
            var read = await CallAsync(keys.ReadAsync, key, "");
            var resolved = await CallAsync(keys.ResolveAsync, key, "{\"release\":true}");

            Assert.All(new[] { read, resolved }, r =>
            {
                Assert.Equal(400, r.Status);
                Assert.EndsWith("request-invalid", r.Json.GetProperty("type").GetString());
            });
        }
    }

    [Theory]
    [InlineData("user:alice", "k", "{\"release\":true,\"claim\":\"not-a-claim\"}")]
    [InlineData("user:alice", null, "{\"release\":true}")]
    [InlineData(null, "k", "{\"release\":true}")]
    [InlineData("user:alice", "k", "")]
    [InlineData("user:alice", "k", "null")]
    [InlineData("user:alice", "k", "{}")]
    [InlineData("user:alice", "k", "{\"respons\":{\"status\":201}}")]
    [InlineData("user:alice", "k", "{\"release\":false}")]
    [InlineData("user:alice", "k", "{\"release\":true,\"response\":{\"status\":201}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":700}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":101}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":503}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":204,\"body\":\"x\"}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":201,\"headers\":[{\"name\":\"X Y\",\"value\":\"v\"}]}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":201,\"headers\":[{\"name\":\"X-Y\",\"value\":\"a\\r\\nb\"}]}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":201,\"headers\":[{\"name\":\"Content-Length\",\"value\":\"9\"}]}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":201,\"bodyBase64\":\"not base64!\"}}")]
    [InlineData("user:alice", "k", "{\"response\":{\"status\":201,\"body\":\"a\",\"bodyBase64\":\"YQ==\"}}")]
    [InlineData("once:http:user:alice", "k", "{\"response\":{\"status\":200,\"body\":\"not json\"}}")]
    [InlineData("once:http:user:alice", "k", "{\"response\":{\"status\":200,\"body\":\"\\\"\\\\ud800\\\"\"}}")]
    [InlineData("user:alice", "k", "{\"response\":")]
    public async Task ResolutionsThatWouldBreakReplays_OrSayNothingClearly_Are400_AndChangeNothing(string? scope, string? key, string body)
    {
        var (harness, inDoubt) = await KeyInDoubtAsync();

        var response = await CallAsync(keys.ResolveAsync, key is null ? null : inDoubt, body, scope);

        Assert.Equal(400, response.Status);
        Assert.EndsWith("request-invalid", response.Json.GetProperty("type").GetString());
        Assert.Equal(409, (await harness.SendAsync(inDoubt)).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ResolutionWithABodyLargerThanTheLayerStores_Is400_AndChangesNothing()
    {
        var (harness, inDoubt) = await KeyInDoubtAsync();
        var body = JsonSerializer.Serialize(new { response = new { status = 201, body = new string('b', IdempotencyPolicy.Default.MaxStoredResponseBytes + 1) } });

        var response = await CallAsync(keys.ResolveAsync, inDoubt, body);

        Assert.Equal(400, response.Status);
        Assert.Contains("are stored", response.Json.GetProperty("detail").GetString(), StringComparison.Ordinal);
        Assert.Equal(409, (await harness.SendAsync(inDoubt)).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task EverySettlement_IsLoggedWithWhoAskedTheKeyTheClaimAndTheDecision()
    {
        var (_, released) = await KeyInDoubtAsync();
        var (_, completed) = await KeyInDoubtAsync();
        var claim = (await CallAsync(keys.ReadAsync, released, "")).Json.GetProperty("claim").GetString();

        await CallAsync(keys.ResolveAsync, released, "{\"release\": true}", user: "ops-carol");
        await CallAsync(keys.ResolveAsync, completed, JsonSerializer.Serialize(new { response = new { status = 201, body = "{}" } }), user: "ops-dave");
        await CallAsync(keys.ResolveAsync, completed, "{\"release\": true}", user: "ops-erin");

        // The third found nothing in doubt: nothing changed, nothing to log.
        var settled = log.Collector.GetSnapshot().Where(r => r.Level == LogLevel.Warning).ToList();
        Assert.Equal(2, settled.Count);
        Assert.Contains(released, settled[0].Message, StringComparison.Ordinal);
        Assert.Contains(claim!, settled[0].Message, StringComparison.Ordinal);
        Assert.Contains("released, as ops-carol asked", settled[0].Message, StringComparison.Ordinal);
        Assert.Contains(completed, settled[1].Message, StringComparison.Ordinal);
        Assert.Contains("completed with status 201, as ops-dave asked", settled[1].Message, StringComparison.Ordinal);
    }

    private static async Task<(int Status, JsonElement Json)> CallAsync(Func<HttpContext, Task> call, string? key, string body, string? scope = "user:alice", string? user = null)
    {
        var context = new DefaultHttpContext();
        if (user is not null)
        {
            context.User = new ClaimsPrincipal(new ClaimsIdentity([new Claim(ClaimTypes.Name, user)], "test"));
        }

        context.Request.Method = "POST";
        context.Request.QueryString = QueryString.Create(new Dictionary<string, string?> { ["scope"] = scope, ["key"] = key }.Where(p => p.Value is not null));
        context.Request.Body = new MemoryStream(Encoding.UTF8.GetBytes(body));
        context.Request.ContentLength = Encoding.UTF8.GetByteCount(body);
        context.Response.Body = new MemoryStream();
        await call(context);
        var bytes = ((MemoryStream)context.Response.Body).ToArray();
        return (context.Response.StatusCode, bytes.Length == 0 ? default : JsonDocument.Parse(bytes).RootElement);
    }
}
