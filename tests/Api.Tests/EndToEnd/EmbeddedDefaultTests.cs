using System.Net;
using System.Net.Http.Json;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// The first run (DESIGN §7): the demo API with no connection strings, hosting a silo on localhost clustering with
/// in-memory records, through real HTTP.
/// </summary>
public sealed class EmbeddedDefaultTests : IAsyncLifetime
{
    private const int Rounds = 5;
    private const int Parallel = 50;

    private ApiServer api = null!;

    public async Task InitializeAsync() =>
        api = await ApiServer.StartAsync(new Dictionary<string, string?>(FreePort.SiloEndpoints())
        {
            ["Logging:LogLevel:Default"] = "Error",
        });

    public async Task DisposeAsync() => await api.DisposeAsync();

    [Fact]
    public async Task NoServers_ParallelDuplicatesOfANewKey_RunOnce_AndAllGetTheSameBytes()
    {
        using var client = api.Client();
        for (var round = 0; round < Rounds; round++)
        {
            var key = Guid.NewGuid().ToString();
            using var start = new ManualResetEventSlim();
            var requests = Enumerable.Range(0, Parallel).Select(_ => Task.Run(async () =>
            {
                start.Wait();
                return await client.SendAsync("/orders", key, Requests.OrderBody, ("X-Demo-Delay-Ms", "200"));
            })).ToArray();
            start.Set();
            var responses = await Task.WhenAll(requests);

            Assert.All(responses, r => Assert.Equal(HttpStatusCode.Created, r.Response.StatusCode));
            Assert.Single(responses, r => !r.Response.IsReplay());
            Assert.Single(responses.Select(r => Convert.ToBase64String(r.Body)).Distinct());
        }

        var orders = await client.GetFromJsonAsync<List<Dictionary<string, object>>>("/orders");
        Assert.Equal(Rounds, orders!.Count);
    }
}
