using System.Text.Json;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

[Collection(EndToEndCollection.Name)]
public sealed class OpenApiTests(EndToEndFixture fixture)
{
    [Fact]
    public async Task OpenApiDocument_AdvertisesTheKeyHeaderAndItsRetention_OnIdempotentOperationsOnly()
    {
        using var client = fixture.Api.Client(apiKey: null);

        var document = JsonDocument.Parse(await client.GetStringAsync("/openapi/v1.json")).RootElement;
        var paths = document.GetProperty("paths");

        var orders = KeyHeader(paths.GetProperty("/orders").GetProperty("post"));
        Assert.NotNull(orders);
        Assert.True(orders.Value.GetProperty("required").GetBoolean());
        Assert.Contains("24 hours", orders.Value.GetProperty("description").GetString(), StringComparison.Ordinal);
        Assert.Contains("waits up to 10 seconds", orders.Value.GetProperty("description").GetString(), StringComparison.Ordinal);
        Assert.Contains("409", KeyHeader(paths.GetProperty("/payments").GetProperty("post"))!.Value.GetProperty("description").GetString(), StringComparison.Ordinal);
        Assert.Null(KeyHeader(paths.GetProperty("/orders").GetProperty("get")));
    }

    private static JsonElement? KeyHeader(JsonElement operation) =>
        operation.TryGetProperty("parameters", out var parameters)
            ? parameters.EnumerateArray().Cast<JsonElement?>().FirstOrDefault(p => p!.Value.GetProperty("name").GetString() == "Idempotency-Key")
            : null;
}
