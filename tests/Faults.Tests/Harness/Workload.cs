using OrleansIdempotency.Testing;
using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;

namespace OrleansIdempotency.Faults.Tests.Harness;

/// <summary>What one logical request (one key) ended with, as the client saw it.</summary>
public sealed record Reply(int Status, string? ProblemType, byte[] Body, bool Replayed);

/// <summary>The shape of a run: which endpoint, how many keys, how many duplicates of each, how long at most.</summary>
public sealed record WorkloadOptions(string KeyPrefix, int Keys, int DuplicatesPerKey, TimeSpan Deadline)
{
    /// <summary><c>/orders</c> (waits for in-flight duplicates) or <c>/payments</c> (rejects them with 409).</summary>
    public string Path { get; init; } = "/orders";

    /// <summary>How many keys are in flight at once; each with all its duplicates.</summary>
    public int KeysInFlight { get; init; } = 32;

    /// <summary>The action's sleep (<c>X-Demo-Delay-Ms</c>), so duplicates really overlap it.</summary>
    public int ActionDelayMs { get; init; } = 20;

    /// <summary>Sent after a key's duplicates all finished: replays of completed keys.</summary>
    public int LateDuplicatesPerKey { get; init; } = 1;
}

/// <summary>Counters of a run, as the clients saw it.</summary>
public sealed class WorkloadStats
{
    private long requests;
    private long serverErrors;
    private long unavailable;
    private long conflicts;
    private long connectionErrors;
    private long unavailableWithoutRetryAfter;

    public long Requests => Interlocked.Read(ref requests);

    /// <summary>Every 5xx answer, 503s included.</summary>
    public long ServerErrors => Interlocked.Read(ref serverErrors);

    public long Unavailable => Interlocked.Read(ref unavailable);

    public long Conflicts => Interlocked.Read(ref conflicts);

    public long ConnectionErrors => Interlocked.Read(ref connectionErrors);

    /// <summary>
    /// Problem answers 503 without <c>Retry-After</c>: the demo's own write left in doubt, whose key is kept and a retry
    /// not invited (every other 503 invites one).
    /// </summary>
    public long UnavailableWithoutRetryAfter => Interlocked.Read(ref unavailableWithoutRetryAfter);

    internal void CountUnavailableWithoutRetryAfter() => Interlocked.Increment(ref unavailableWithoutRetryAfter);

    internal void Count(HttpStatusCode status)
    {
        Interlocked.Increment(ref requests);
        if ((int)status >= 500)
        {
            Interlocked.Increment(ref serverErrors);
        }

        if (status == HttpStatusCode.ServiceUnavailable)
        {
            Interlocked.Increment(ref unavailable);
        }

        if (status == HttpStatusCode.Conflict)
        {
            Interlocked.Increment(ref conflicts);
        }
    }

    internal void CountConnectionError()
    {
        Interlocked.Increment(ref requests);
        Interlocked.Increment(ref connectionErrors);
    }
}

/// <summary>
/// Many concurrent clients: new keys, duplicates in flight and after completion, spread over the API nodes. Each
/// retries the way a careful client does: same key, same body; after a connection error or time-out on another
/// node; after 409 in-progress and 503 when <c>Retry-After</c> says; after a 5xx that released the key.
/// </summary>
public sealed class Workload(IReadOnlyList<Uri> nodes)
{
    private readonly HttpClient[] clients = nodes.Select(node => new HttpClient(new SocketsHttpHandler { PooledConnectionLifetime = TimeSpan.FromMinutes(1) })
    {
        BaseAddress = node,
        Timeout = TimeSpan.FromSeconds(20),
        DefaultRequestHeaders = { Authorization = new AuthenticationHeaderValue("Bearer", "demo-alice") },
    }).ToArray();

    public ConcurrentDictionary<string, ConcurrentBag<Reply>> Replies { get; } = new();

    public ConcurrentDictionary<string, int> GaveUp { get; } = new();

    public WorkloadStats Stats { get; } = new();

    public static string Body(string path, string key) => path == "/payments"
        ? "{\"amount\":5.00,\"currency\":\"EUR\"}"
        : $"{{\"customerId\":\"{key}\",\"amount\":12.50,\"items\":[{{\"sku\":\"A1\",\"quantity\":2}}]}}";

    public static string Key(WorkloadOptions options, int index) => options.KeyPrefix + index.ToString("D6", CultureInfo.InvariantCulture);

    /// <summary>Runs every key to an answer, or to the deadline.</summary>
    public async Task RunAsync(WorkloadOptions options, CancellationToken stop = default)
    {
        var deadline = DateTime.UtcNow + options.Deadline;
        await Parallel.ForEachAsync(Enumerable.Range(0, options.Keys),
            new ParallelOptions { MaxDegreeOfParallelism = options.KeysInFlight, CancellationToken = stop },
            async (index, _) =>
            {
                var key = Key(options, index);
                await Task.WhenAll(Enumerable.Range(0, options.DuplicatesPerKey)
                    .Select(copy => SendUntilAnsweredAsync(options, key, index + copy, deadline, options.ActionDelayMs)));
                for (var late = 0; late < options.LateDuplicatesPerKey; late++)
                {
                    await SendUntilAnsweredAsync(options, key, index + late + 1, deadline, 0);
                }
            });
    }

    /// <summary>Sends one logical request until it gets a final answer; records it.</summary>
    public async Task<Reply?> SendUntilAnsweredAsync(WorkloadOptions options, string key, int node, DateTime deadline, int delayMs)
    {
        var body = Body(options.Path, key);
        while (DateTime.UtcNow < deadline)
        {
            var client = clients[node % clients.Length];
            using var request = new HttpRequestMessage(HttpMethod.Post, options.Path) { Content = new StringContent(body, Encoding.UTF8, "application/json") };
            request.Headers.Add("Idempotency-Key", key);
            if (delayMs > 0)
            {
                request.Headers.Add("X-Demo-Delay-Ms", delayMs.ToString(CultureInfo.InvariantCulture));
            }

            HttpResponseMessage response;
            byte[] bytes;
            try
            {
                response = await client.SendAsync(request);
                bytes = await response.Content.ReadAsByteArrayAsync();
            }
            catch (Exception ex) when (ex is HttpRequestException or TaskCanceledException or IOException)
            {
                Stats.CountConnectionError();
                node++;
                await Task.Delay(200);
                continue;
            }

            using (response)
            {
                Stats.Count(response.StatusCode);
                var problemType = response.Content.Headers.ContentType?.MediaType == "application/problem+json" ? ProblemType(bytes) : null;
                var retryAfter = response.Headers.RetryAfter?.Delta;
                if (response.StatusCode == HttpStatusCode.ServiceUnavailable && retryAfter is null && problemType is not null)
                {
                    Stats.CountUnavailableWithoutRetryAfter();
                }

                var retry = (int)response.StatusCode >= 500 || problemType?.EndsWith("/request-in-progress", StringComparison.Ordinal) == true;
                if (!retry)
                {
                    var reply = new Reply((int)response.StatusCode, problemType, bytes, response.Headers.Contains("Idempotent-Replayed"));
                    Replies.GetOrAdd(key, _ => []).Add(reply);
                    return reply;
                }

                await Task.Delay(retryAfter is { } delay ? TimeSpan.FromMilliseconds(Math.Min(delay.TotalMilliseconds, 1000)) : TimeSpan.FromMilliseconds(200));
            }
        }

        GaveUp.AddOrUpdate(key, 1, (_, count) => count + 1);
        return null;
    }

    private static string? ProblemType(byte[] body)
    {
        try
        {
            return JsonDocument.Parse(body).RootElement.TryGetProperty("type", out var type) ? type.GetString() : null;
        }
        catch (JsonException)
        {
            return null;
        }
    }
}
