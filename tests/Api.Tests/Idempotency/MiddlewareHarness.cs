using System.Text;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Options;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>
/// Drives <see cref="IdempotencyMiddleware"/> with <see cref="DefaultHttpContext"/>s and endpoint metadata, the way
/// ASP.NET Core's own middleware tests do, and counts how often the endpoint ran.
/// </summary>
internal sealed class MiddlewareHarness
{
    private readonly MiddlewareClusterFixture fixture;
    private readonly IdempotencyMiddleware middleware;
    private int executions;

    public MiddlewareHarness(MiddlewareClusterFixture fixture, RequestDelegate endpoint, IdempotencyPolicy? policy = null, IIdempotencyMetadata? metadata = null,
        ILogger<IdempotencyGrainCalls>? callsLog = null, ILogger<IdempotencyMiddleware>? log = null, ILogger<IdempotencyProblems>? problemsLog = null)
    {
        this.fixture = fixture;
        var options = Options.Create(new IdempotencyOptions { DefaultPolicy = policy ?? IdempotencyPolicy.Default, ClusterRetryBudget = TimeSpan.FromSeconds(2) });
        var meters = Meters = new ServiceCollection().AddMetrics().BuildServiceProvider().GetRequiredService<System.Diagnostics.Metrics.IMeterFactory>();
        Metadata = metadata ?? new IdempotentAttribute();
        Endpoint = context =>
        {
            Interlocked.Increment(ref executions);
            return endpoint(context);
        };
        Calls = fixture.Calls(options, callsLog);
        middleware = new IdempotencyMiddleware(
            Endpoint,
            options,
            Calls,
            new IdempotencyProblems(options, problemsLog ?? NullLogger<IdempotencyProblems>.Instance),
            new IdempotencyMetrics(meters, Calls),
            new ReplayCache(options, fixture.Time),
            fixture.Time,
            log ?? NullLogger<IdempotencyMiddleware>.Instance);
    }

    public IIdempotencyMetadata Metadata { get; }

    /// <summary>The meters of this harness's middleware alone.</summary>
    public System.Diagnostics.Metrics.IMeterFactory Meters { get; }

    /// <summary>The middleware's grain calls, with the writes they retry in the background.</summary>
    public IdempotencyGrainCalls Calls { get; }

    public RequestDelegate Endpoint { get; }

    public int Executions => Volatile.Read(ref executions);

    public static string NewKey() => Guid.NewGuid().ToString();

    /// <summary>Polls <paramref name="condition"/> until it holds, for at most 10 seconds.</summary>
    public static async Task WaitUntilAsync(Func<Task<bool>> condition)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (!await condition())
        {
            Assert.True(DateTime.UtcNow < deadline, "The condition did not come true in time.");
            await Task.Delay(20);
        }
    }

    public static HttpContext Request(string? key, string body = "{\"amount\":1}", string method = "POST", string path = "/orders",
        string query = "", string user = "alice", IIdempotencyMetadata? metadata = null, Action<HttpContext>? configure = null)
    {
        var context = new DefaultHttpContext();
        context.Request.Method = method;
        context.Request.Path = path;
        context.Request.QueryString = new QueryString(query);
        context.Request.Body = new MemoryStream(Encoding.UTF8.GetBytes(body));
        context.Request.ContentLength = Encoding.UTF8.GetByteCount(body);
        context.Response.Body = new MemoryStream();
        if (key is not null)
        {
            context.Request.Headers[IdempotencyKeyHeader.Name] = key;
        }

        if (user.Length > 0)
        {
            context.User = new System.Security.Claims.ClaimsPrincipal(new System.Security.Claims.ClaimsIdentity(
                [new System.Security.Claims.Claim(System.Security.Claims.ClaimTypes.NameIdentifier, user)], "test"));
        }

        configure?.Invoke(context);
        return context;
    }

    /// <summary>The middleware itself, for a context whose endpoint is already set.</summary>
    public Task InvokeAsync(HttpContext context) => middleware.InvokeAsync(context);

    public async Task<HttpContext> SendAsync(HttpContext context)
    {
        if (context.GetEndpoint() is null)
        {
            context.SetEndpoint(new Endpoint(Endpoint, new EndpointMetadataCollection(Metadata), "test endpoint"));
        }

        await middleware.InvokeAsync(context);
        return context;
    }

    public Task<HttpContext> SendAsync(string? key, string body = "{\"amount\":1}", string method = "POST", string path = "/orders", string query = "", string user = "alice") =>
        SendAsync(Request(key, body, method, path, query, user));

    public IIdempotencyGrain Grain(string key, string scope = "user:alice") => fixture.Grains.GetIdempotencyGrain(new IdempotencyKey(scope, key));

    /// <summary>
    /// Asserts that <paramref name="key"/>'s one run may have taken effect: its claim is left in progress, lapses
    /// into outcome-unknown (409), and the action never runs again.
    /// </summary>
    public async Task AssertLeftInDoubtAsync(string key)
    {
        Assert.Equal(IdempotencyStatus.InProgress, (await Grain(key).GetAsync()).Status);
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        Assert.Equal(409, (await SendAsync(key)).Response.StatusCode);
        Assert.Equal(1, Executions);
    }

    /// <summary>Like <see cref="Creates"/>, once <paramref name="released"/> completes: keeps a request in flight.</summary>
    public static RequestDelegate CreatesAfter(Task released) => async context =>
    {
        await released;
        await Creates()(context);
    };

    /// <summary>An endpoint that answers 201 with a fresh id each time it runs, as a create does.</summary>
    public static RequestDelegate Creates(int status = 201) => async context =>
    {
        context.Response.StatusCode = status;
        context.Response.ContentType = "application/json";
        context.Response.Headers.Location = "/orders/" + Guid.NewGuid();
        context.Response.Headers.SetCookie = "session=secret";
        context.Response.Headers["X-Not-Stored"] = "1";
        await context.Response.WriteAsync($"{{\"id\":\"{Guid.NewGuid()}\"}}");
    };
}

internal static class HttpContextExtensions
{
    public static string Body(this HttpContext context)
    {
        var stream = (MemoryStream)context.Response.Body;
        return Encoding.UTF8.GetString(stream.ToArray());
    }

    public static byte[] BodyBytes(this HttpContext context) => ((MemoryStream)context.Response.Body).ToArray();

    public static System.Text.Json.JsonElement Problem(this HttpContext context)
    {
        Assert.Equal("application/problem+json", context.Response.ContentType);
        return System.Text.Json.JsonDocument.Parse(context.Body()).RootElement;
    }

    public static IHttpResponseBodyFeature BodyFeature(this HttpContext context) => context.Features.GetRequiredFeature<IHttpResponseBodyFeature>();
}

/// <summary>A request body Kestrel gives up on partway, as it does on a broken chunk or a body that comes too slowly.</summary>
internal sealed class RefusedBody(Exception failure) : MemoryStream("{\"amount\""u8.ToArray())
{
    private bool started;

    public RefusedBody(int status)
        : this(new BadHttpRequestException("The request body could not be read (test).", status))
    {
    }

    /// <summary>Runs as the read fails: a reset client's request token fires with it.</summary>
    public Action? AsItFails { get; init; }

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (started)
        {
            AsItFails?.Invoke();
            throw failure;
        }

        started = true;
        return base.ReadAsync(buffer, cancellationToken);
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();
}
